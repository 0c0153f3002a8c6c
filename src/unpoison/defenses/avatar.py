"""AVATAR (App. C.2): purify by diffusing to step t* with a DDPM trained on clean data, then denoising.

A diffusion model (diffusers' :class:`UNet2DModel` + :class:`DDPMScheduler`, epsilon prediction,
linear betas, 1000 steps) is trained on clean data of the same domain by :func:`train_diffusion`
(``unpoison train-diffusion``). Purification noises each image forward to ``t_star`` in closed
form (``q(x_t | x_0)``) and runs ``t_star`` ancestral DDPM reverse steps back to ``x_0``; the added
Gaussian noise drowns the small poison and the model's prior fills in clean image content.

Checkpoints are one ``.pt`` file: ``{"format", "version", "config" (a JSON string), "state_dict"}``
written atomically and read back with ``torch.load(weights_only=True)`` (no arbitrary pickle).
Images whose sides are not a multiple of the UNet's downsampling factor are reflect-padded and
cropped back. Training and sampling take their speed switches (bf16 autocast, fused AdamW,
channels_last) from an :class:`~unpoison.accel.Accel`, by default ``Accel.auto(device, "diffusion")``.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from ..accel import Accel
from ..checkpoints import load_state, save_state
from ..data import ImageDataset, make_synthetic
from ..errors import UserError
from ..params import Param
from ..presets import PresetTable, register_presets
from ..tags import Tags
from ..tensors import pick_device, rng_scope
from .base import DEFENSES, Dependency, Purifier, require_packages

FORMAT = "unpoison-diffusion"
#: the checkpoint a grid's train-diffusion cell writes into its folder
DIFFUSION_FILE = "diffusion.pt"
VERSION = 1

#: UNet sizes and training settings. ``toy``: tests on CPU (seconds); ``cpu``: small Fashion-MNIST
#: runs; ``paper``: the DDPM CIFAR-10 architecture (35.7M parameters), for a GPU.
PRESETS: dict[str, dict[str, Any]] = {
    "toy": {"block_out_channels": [16, 32], "layers_per_block": 1, "attention": [False, False],
            "norm_num_groups": 8, "epochs": 2, "batch_size": 64, "lr": 1e-3, "ema_decay": 0.0},
    "cpu": {"block_out_channels": [32, 64, 64], "layers_per_block": 1, "attention": [False, False, False],
            "norm_num_groups": 16, "epochs": 20, "batch_size": 128, "lr": 5e-4, "ema_decay": 0.999},
    "paper": {"block_out_channels": [128, 256, 256, 256], "layers_per_block": 2,
              "attention": [False, True, False, False], "norm_num_groups": 32, "epochs": 400,
              "batch_size": 128, "lr": 2e-4, "ema_decay": 0.9999},
}
NUM_TRAIN_TIMESTEPS = 1000
DIFFUSION_PRESETS = register_presets(PresetTable(
    "diffusion", PRESETS, keys=frozenset(PRESETS["paper"]), aliases={"smoke": "toy"},
    help="the DDPM that AVATAR denoises with"))


def _require_diffusers() -> Any:
    require_packages("avatar")  # the package its tags name, with the pip extra that brings it
    import diffusers

    return diffusers


def make_config(preset: str, channels: int, height: int, width: int, **overrides: Any) -> dict[str, Any]:
    """The JSON config stored in a checkpoint: UNet shape, data shape, schedule, training settings."""
    preset = DIFFUSION_PRESETS.resolve(preset)
    cfg = {"preset": preset, **json.loads(json.dumps(DIFFUSION_PRESETS.values(preset, overrides)))}
    factor = 2 ** (len(cfg["block_out_channels"]) - 1)
    cfg.update({"channels": int(channels), "height": int(height), "width": int(width),
                "padded_height": int(math.ceil(height / factor) * factor),
                "padded_width": int(math.ceil(width / factor) * factor),
                "num_train_timesteps": NUM_TRAIN_TIMESTEPS, "beta_schedule": "linear",
                "prediction_type": "epsilon"})
    return cfg


def build_unet(cfg: dict[str, Any]) -> nn.Module:
    diffusers = _require_diffusers()
    att = cfg["attention"]
    return diffusers.UNet2DModel(
        sample_size=(cfg["padded_height"], cfg["padded_width"]),
        in_channels=cfg["channels"], out_channels=cfg["channels"],
        block_out_channels=tuple(cfg["block_out_channels"]), layers_per_block=cfg["layers_per_block"],
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in att),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(att)),
        norm_num_groups=cfg["norm_num_groups"], add_attention=any(att),
    )


def build_scheduler(cfg: dict[str, Any]) -> Any:
    diffusers = _require_diffusers()
    return diffusers.DDPMScheduler(num_train_timesteps=cfg["num_train_timesteps"],
                                   beta_schedule=cfg["beta_schedule"], prediction_type=cfg["prediction_type"])


def _to_model_space(x_u8: np.ndarray, cfg: dict[str, Any], dev: torch.device) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1], reflect-padded to the UNet's size."""
    x = torch.from_numpy(np.ascontiguousarray(x_u8)).to(dev).permute(0, 3, 1, 2).float().div_(127.5).sub_(1)
    ph, pw = cfg["padded_height"] - cfg["height"], cfg["padded_width"] - cfg["width"]
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="reflect")
    return x


def _to_uint8(x: torch.Tensor, cfg: dict[str, Any]) -> np.ndarray:
    x = x[:, :, :cfg["height"], :cfg["width"]]
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_checkpoint(path: str | Path, cfg: dict[str, Any], model: nn.Module) -> None:
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_state(path, {"format": FORMAT, "version": VERSION, "config": json.dumps(cfg), "state_dict": state})


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Load a diffusion checkpoint safely (``weights_only=True``); any problem is a :class:`UserError`."""
    p = Path(path)
    if not p.is_file():
        raise UserError("diffusion checkpoint not found", p)
    blob = load_state(p, "diffusion checkpoint")
    if not isinstance(blob, dict) or blob.get("format") != FORMAT or "state_dict" not in blob:
        raise UserError(f"not an unpoison diffusion checkpoint (expected format {FORMAT!r}; "
                        "make one with 'unpoison train-diffusion')", p)
    if blob.get("version") != VERSION:
        raise UserError(f"diffusion checkpoint version {blob.get('version')!r} is not supported (want {VERSION})", p)
    try:
        cfg = json.loads(blob["config"])
        model = build_unet(cfg)
        model.load_state_dict(blob["state_dict"])
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001
        raise UserError(f"diffusion checkpoint does not match its config ({type(e).__name__}: {str(e)[:200]})",
                        p) from None
    return model.to(pick_device(device)).eval(), cfg


def train_diffusion(ds: ImageDataset, preset: str = "toy", epochs: int | None = None, batch_size: int | None = None,
                    lr: float | None = None, seed: int = 0, device: str | torch.device = "auto",
                    progress: bool = True, flip: bool = True,
                    accel: Accel | None = None) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """Train a DDPM on ``ds``'s training split (clean data of the target domain).

    Returns ``(model, config, record)``; the model holds the EMA weights when the preset uses EMA
    (DDPM's practice: sampling from the averaged weights is much cleaner).
    """
    h, w, c = ds.image_shape
    cfg = make_config(preset, c, h, w, epochs=epochs, batch_size=batch_size, lr=lr)
    if cfg["epochs"] < 1 or cfg["batch_size"] < 1 or not cfg["lr"] > 0:
        raise UserError("epochs, batch size and learning rate must be positive")
    dev = pick_device(device)
    gen = torch.Generator(device=dev)
    gen.manual_seed(seed)
    accel = accel or Accel.auto(dev, "diffusion")
    with rng_scope(seed, dev):  # weight init; every training draw uses ``gen``
        model = build_unet(cfg).to(dev, memory_format=accel.memory_format)
    sched = build_scheduler(cfg)
    x_all = _to_model_space(ds.x_train, cfg, dev)
    n = len(x_all)
    bs = min(cfg["batch_size"], n)
    steps = (n + bs - 1) // bs
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.0,
                            fused=accel.fused_adam or None)  # None: torch picks foreach, as before
    ema = None
    if cfg["ema_decay"] > 0:
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg["ema_decay"]))
    history: list[dict[str, float]] = []
    t0 = time.perf_counter()
    bar = tqdm(range(cfg["epochs"]), desc="train-diffusion", disable=not progress, dynamic_ncols=True)
    for ep in bar:
        model.train()
        perm = torch.randperm(n, device=dev, generator=gen)
        tot = torch.zeros((), device=dev)
        for i in range(steps):
            xb = x_all[perm[i * bs:(i + 1) * bs]]
            if flip:
                m = torch.rand(len(xb), device=dev, generator=gen) < 0.5
                xb = torch.where(m[:, None, None, None], xb.flip(3), xb)
            noise = torch.randn(xb.shape, device=dev, generator=gen)
            t = torch.randint(0, cfg["num_train_timesteps"], (len(xb),), device=dev, generator=gen)
            xt = sched.add_noise(xb, noise, t).contiguous(memory_format=accel.memory_format)
            with accel.autocast(dev):
                pred = model(xt, t).sample
            loss = F.mse_loss(pred.float(), noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if ema is not None:
                ema.update_parameters(model)
            tot += loss.detach() * len(xb)
        history.append({"epoch": ep + 1, "loss": tot.item() / n})
        bar.set_postfix(loss=f"{history[-1]['loss']:.4f}")
    final = ema.module if ema is not None else model
    record = {"history": history, "train_time_s": time.perf_counter() - t0, "n_train": n, "accel": accel.to_dict(),
              "parameters": sum(p.numel() for p in final.parameters())}
    return final.eval(), cfg, record


@DEFENSES.register("avatar", help="AVATAR: diffuse to t* with a DDPM trained on clean data, then denoise")
class AvatarPurifier(Purifier):
    """Diffusion purification with a checkpoint from ``unpoison train-diffusion``."""

    PARAMS = {
        "checkpoint": Param(str, None, "diffusion checkpoint (.pt) from 'unpoison train-diffusion'"),
        "t_star": Param(int, 100, "diffusion step to noise to (of 1000); larger removes more, and more content",
                        low=1, high=NUM_TRAIN_TIMESTEPS - 1),
        "batch_size": Param(int, 256, "images per denoising batch", low=1),
    }
    COMMON = frozenset({"device", "seed", "progress"})
    tags = Tags(requires=(("diffusers", "diffusion"),))
    #: without a checkpoint, a grid whose config has ``diffusion:`` trains one first (kind train-diffusion)
    DEPENDENCY = Dependency(kind="train-diffusion", config_key="diffusion", param="checkpoint", file=DIFFUSION_FILE)

    def __init__(self, checkpoint: str | None = None, t_star: int = 100, batch_size: int = 256,
                 device: str = "auto", seed: int = 0, progress: bool = True, accel: Accel | None = None) -> None:
        if not checkpoint:
            raise UserError("avatar needs --checkpoint PATH (train one with 'unpoison train-diffusion')")
        super().__init__(checkpoint=str(checkpoint), t_star=t_star, batch_size=batch_size)
        self.checkpoint, self.t_star, self.batch_size = (self.params[k] for k in ("checkpoint", "t_star", "batch_size"))
        self.device, self.seed, self.progress = device, seed, progress
        self.accel = accel  # None: Accel.auto(device, "diffusion") once the device is known

    def required_files(self) -> list[str]:
        return [self.checkpoint]

    @classmethod
    def smoke(cls, workdir: Path, image_shape: tuple[int, int, int]) -> dict[str, Any]:
        """A toy DDPM trained for one epoch on synthetic images of ``image_shape``, denoising from t* = 2."""
        h, w, c = image_shape
        path = Path(workdir) / "avatar-smoke.pt"
        if not path.is_file():
            ds = make_synthetic(n=16, size=h, channels=c, classes=2, seed=0)
            model, cfg, _ = train_diffusion(ds, "toy", epochs=1, device="cpu", progress=False)
            save_checkpoint(path, cfg, model)
        return {"checkpoint": str(path), "t_star": 2}

    def _transform(self, x: np.ndarray, y: np.ndarray | None) -> np.ndarray:
        dev = pick_device(self.device)
        model, cfg = load_checkpoint(self.checkpoint, dev)
        accel = self.accel or Accel.auto(dev, "diffusion")
        model.to(memory_format=accel.memory_format)
        h, w, c = x.shape[1:]
        if (c, h, w) != (cfg["channels"], cfg["height"], cfg["width"]):
            raise UserError(f"checkpoint was trained on {cfg['channels']}x{cfg['height']}x{cfg['width']} images, "
                            f"the data is {c}x{h}x{w}", self.checkpoint)
        sched = build_scheduler(cfg)
        gen = torch.Generator(device=dev)
        gen.manual_seed(self.seed)
        out = np.empty_like(x)
        n_batches = (len(x) + self.batch_size - 1) // self.batch_size
        bar = tqdm(total=n_batches * (self.t_star + 1), desc="avatar denoise", disable=not self.progress,
                   dynamic_ncols=True, unit="step")
        t0 = time.perf_counter()
        with torch.no_grad():
            for i in range(0, len(x), self.batch_size):
                x0 = _to_model_space(x[i:i + self.batch_size], cfg, dev)
                noise = torch.randn(x0.shape, device=dev, generator=gen)
                t_idx = torch.full((len(x0),), self.t_star, device=dev, dtype=torch.long)
                xt = sched.add_noise(x0, noise, t_idx)
                for t in range(self.t_star, -1, -1):
                    with accel.autocast(dev):
                        eps = model(xt.contiguous(memory_format=accel.memory_format), t).sample
                    xt = sched.step(eps.float(), t, xt, generator=gen).prev_sample
                    bar.update(1)
                out[i:i + self.batch_size] = _to_uint8(xt, cfg)
        bar.close()
        self.info_ = {"t_star": self.t_star, "checkpoint_preset": cfg["preset"], "accel": accel.to_dict(),
                      "denoise_time_s": time.perf_counter() - t0}
        return out
