"""D-VAE two-stage purification (Algorithm 1), and the VAE / AE reconstruction baselines.

Stage 1 trains a fresh D-VAE on the poisoned images ``x0`` with a tight rate limit and subtracts
its perturbation estimate: ``x1 = clip(x0 - p_hat(x0))``. Stage 2 trains another fresh D-VAE on
``x1`` (looser limit): ``x2 = clip(x1 - p_hat(x1))``, ``x3 = x_hat(x2)``. Intermediate images are
rounded to uint8 (they are datasets in their own right and this keeps checkpoints small).

Every hyperparameter lives in :class:`DVAEConfig` and its presets (``paper``, ``imagenet``,
``cpu``). Training keeps the whole split on the device as uint8; the speed switches (bf16 autocast,
fused Adam, ``torch.compile`` of the conv stacks, channels_last, inference batch) come from an
:class:`~unpoison.accel.Accel` (default: :func:`dvae_accel`, all on for CUDA). Training checkpoints
every epoch, RNG states included, so ``resume=True`` continues a killed run exactly. ``p_hat``
arrays are float16 NHWC in 0..255 pixel units (``x0 + p_hat`` is directly comparable with uint8 images).

**Larger than memory.** When a split times :attr:`_AutoencoderPurifier.RESIDENT_FACTOR` does not fit
the memory budget (``memory_budget``; see :mod:`unpoison.stream`), training reads shuffled batches
from disk through a prefetching :class:`~unpoison.stream.StreamedSource`, and every stage writes its
images into a ``.npy`` by rows (in ``checkpoint_dir``, else a scratch folder); ``transform`` then
returns read-only memmaps. The permutation and the batches are the same as on the resident path,
so the result is the same, bit for bit. **Several processes** (``dist``, from
:func:`unpoison.distributed.init` under ``torchrun``): each stage trains data-parallel (DDP; each
rank reads its share of every global batch of ``batch_size``), rank 0 writes the checkpoints, and
inference deals whole batches to ranks, which write disjoint rows of the same files.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .. import rng
from ..accel import Accel, dvae_channels_last
from ..data.fingerprint import content_fingerprint
from ..data.rows import NpyWriter
from ..distributed import SINGLE, DistContext
from ..errors import NonFiniteError, UserError, check_finite_loss
from ..models.dvae import (
    DVAE,
    EMBEDDINGS,
    LOSS_FORMS,
    P_INPUTS,
    BottleneckAE,
    RateConstrainedVAE,
    ae_loss,
    check_geometry,
    dvae_loss,
    vae_loss,
)
from ..presets import PresetTable, register_presets, show_value
from ..stream import (
    BatchSource,
    NpySink,
    ResidentSource,
    TensorSink,
    fits,
    make_source,
    memory_budget,
    open_array,
    plan_line,
    shard_batches,
    shard_ranges,
)
from ..tensors import pick_device, rng_scope, to_device_images
from ..utils import atomic_path, psnr_from_mse, write_json
from .base import DEFENSES, Purifier

EpochCallback = Callable[[dict[str, Any]], None]
#: images of each intermediate stage kept in ``stages_`` when streaming (the report's grid shows 8)
GRID_ROWS = 8


def _coerce(v: Any, typ: type, name: str) -> Any:
    """``v`` as ``typ``; strings such as ``"false"`` / ``"0"`` are read as booleans, not as truthy text."""
    if typ is bool and isinstance(v, str):
        low = v.strip().lower()
        if low not in ("1", "0", "true", "false", "yes", "no"):
            raise UserError(f"D-VAE {name} must be true or false, got {v!r}")
        return low in ("1", "true", "yes")
    try:
        return typ(v)
    except (TypeError, ValueError):
        raise UserError(f"D-VAE {name} must be a {typ.__name__}, got {v!r}") from None


@dataclass
class DVAEConfig:
    """All purification hyperparameters (paper B.2 + release); presets in :data:`PRESETS`."""

    width: int = 64  # encoder width w (features 2w at the latent resolution)
    width1: int = 0  # stage-1 width (0: ``width``); stage 1's p_hat is as clean as its image branch is good
    latent: int = 256  # latent channels of mu / logvar
    epochs: int = 60  # per stage
    steps: int = 0  # > 0: size each stage by optimizer steps instead (epochs = ceil(steps / batches per epoch))
    batch_size: int = 128
    lr: float = 5e-3  # Adam, cosine to 0 over all steps of a stage
    grad_clip: float = 5.0
    kld_weight: float = 0.01  # lambda of Eq. 14
    kld_weight1: float = 0.0  # stage-1 lambda (0: kld_weight); max(KLD, limit) is a floor, so a limit below
    # the rate lambda settles at does nothing: the release raises lambda to 0.5 for limits below 0.99
    kld_limit1: float = 1.0  # stage 1
    kld_limit2: float = 3.0  # stage 2
    downsample1: int = 2  # stage-1 latent resolution is H/downsample1
    downsample2: int = 2
    p_input: str = "class"  # what D_p sees besides u_y: class (u_y only), z (paper text), features (release)
    embedding: str = "spatial"  # u_y: spatial (2w x H/d x W/d per class) or vector (2w, broadcast; release)
    embed_std: float = 0.0  # initial N(0, std) of u_y; 0 = zeros (the release's nn.Embedding: 1)
    loss_form: str = "paper"  # Eq. 14's second term: paper (x - x_hat vs p_hat) or release (clamped sum)
    rec_weight: float = 1.0  # weight of ||x - x_hat||^2 in Eq. 14 (paper: 1)
    detach_residual: bool = True  # no gradient from Eq. 14's second term into x_hat
    p_cap: float = 0.0  # > 0: add max(mean(p_hat^2), p_cap) (the release: 0.002); 0 = off
    skip_stage1: bool = False  # ablation (Table 6): purify with stage 2 only
    stage2_subtract: bool = True  # ablation (Table 6): False -> x3 = x_hat(x1)
    kld_limit: float = 1.0  # the plain rate-constrained VAE (``vae``)
    downsample: int = 2  # ``vae`` / ``ae``
    bottleneck: int = 8  # ``ae``: channels of the code
    infer_batch: int = 0  # 0: 1024 on CUDA, 256 on CPU (faster there)
    compile: str = "auto"  # auto: torch.compile the conv stacks on CUDA only; "yes" / "no"

    @classmethod
    def preset(cls, name: str = "paper", **overrides: Any) -> DVAEConfig:
        """The named preset (or ``auto``) with ``overrides`` (None = keep the preset's; unknown = error)."""
        table = DVAE_PRESETS.values(name, overrides)
        if overrides and overrides.get("epochs") is not None and overrides.get("steps") is None:
            table["steps"] = 0  # an explicit epoch count wins over a preset's step count
        cfg = cls()
        for k, v in table.items():
            setattr(cfg, k, _coerce(v, type(getattr(cfg, k)), k))
        cfg.check()
        return cfg

    def epochs_for(self, n: int) -> int:
        """Epochs per stage for ``n`` training images: ``epochs``, or enough to reach ``steps`` when set."""
        if self.steps <= 0:
            return self.epochs
        return max(1, math.ceil(self.steps / max(1, math.ceil(n / self.batch_size))))

    def check(self) -> None:
        for k, hi in (("width", 4096), ("latent", 65536), ("epochs", 10**6), ("batch_size", 2**20),
                      ("bottleneck", 65536), ("downsample1", 1024), ("downsample2", 1024), ("downsample", 1024)):
            if not 1 <= getattr(self, k) <= hi:
                raise UserError(f"D-VAE {k} must be in [1, {hi}], got {getattr(self, k)}")
        for k, hi in (("width1", 4096), ("steps", 10**9), ("infer_batch", 2**31)):
            if not 0 <= getattr(self, k) <= hi:
                raise UserError(f"D-VAE {k} must be in [0, {hi}], got {getattr(self, k)}")
        # finite first: `lr inf` once trained an all-zero "purified" set, and `nan < 0` is False
        for k in ("lr", "kld_weight", "kld_weight1", "grad_clip", "kld_limit1", "kld_limit2", "kld_limit",
                  "embed_std", "p_cap", "rec_weight"):
            if not math.isfinite(getattr(self, k)):
                raise UserError(f"D-VAE {k} must be a finite number, got {getattr(self, k)}")
        for k in ("lr", "kld_weight", "grad_clip"):
            if not getattr(self, k) > 0:
                raise UserError(f"D-VAE {k} must be > 0, got {getattr(self, k)}")
        if self.kld_weight1 < 0:
            raise UserError(f"D-VAE kld_weight1 must be >= 0, got {self.kld_weight1}")
        for k in ("kld_limit1", "kld_limit2", "kld_limit"):
            if getattr(self, k) < 0:
                raise UserError(f"D-VAE {k} must be >= 0, got {getattr(self, k)}")
        if self.p_input not in P_INPUTS:
            raise UserError(f"p_input must be one of {', '.join(P_INPUTS)}, got {self.p_input!r}")
        if self.embedding not in EMBEDDINGS:
            raise UserError(f"embedding must be one of {', '.join(EMBEDDINGS)}, got {self.embedding!r}")
        if self.loss_form not in LOSS_FORMS:
            raise UserError(f"loss_form must be one of {', '.join(LOSS_FORMS)}, got {self.loss_form!r}")
        if self.embed_std < 0 or self.p_cap < 0:
            raise UserError("embed_std and p_cap must be >= 0")
        if self.compile not in ("auto", "yes", "no"):
            raise UserError(f"compile must be auto, yes or no, got {self.compile!r}")


#: the presets, in one place. ``paper`` keeps the paper's numbers (rates 1.0 / 3.0 at lambda 0.01). ``cpu``:
#: sized by optimizer steps (700 per stage, rounded up to whole epochs), so 3,000 and 60,000 images both get a
#: trained model; stage 1 twice as wide as stage 2, since its p_hat is only as clean as its image branch is
#: good; stage-1 rate 0.5 nat at lambda 0.05 (the paper's 1.0 at 0.01 let half of OPS through the image
#: branch: OPS-poisoned Fashion-MNIST, 10,000 images, purified scored 76.6 % at 1.0 and 87.1 % at 0.5; LSP
#: 87.9 and 87.4). Measurements: docs/results/disentangle.md.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    "imagenet": {"downsample1": 8, "kld_limit1": 1.5, "epochs": 20},
    "cpu": {"width": 8, "width1": 16, "latent": 32, "steps": 700, "batch_size": 64, "kld_limit1": 0.5,
            "kld_weight1": 0.05},
}

DVAE_PRESETS = register_presets(PresetTable("dvae", PRESETS, keys=frozenset(f.name for f in fields(DVAEConfig)),
                                            aliases={"smoke": "cpu"}, help="D-VAE / VAE / AE purification",
                                            label="D-VAE"))

_COMMON_PARAMS: dict[str, tuple[type, Any, str]] = {
    "width": (int, None, "auto-encoder width w (default: the preset's)"),
    "latent": (int, None, "latent channels (default: the preset's)"),
    "epochs": (int, None, "training epochs per stage (default: the preset's)"),
    "steps": (int, None, "optimizer steps per stage, rounded up to whole epochs; overrides epochs (cpu preset)"),
    "batch_size": (int, None, "training batch size (default: the preset's)"),
    "lr": (float, None, "Adam learning rate (default: the preset's)"),
}


# --- checkpoints ----------------------------------------------------------------------------------
def data_fingerprint(x: np.ndarray, y: np.ndarray | None) -> str:
    """The resume key's data part: the one streamed content fingerprint (bounded memory on memmaps)."""
    return content_fingerprint(x, None if y is None else np.asarray(y).astype(np.int64, copy=False))


class Checkpointer:
    """Per-epoch training state and per-stage outputs in ``directory``, tagged with a fingerprint.

    Files are written atomically and read with ``torch.load(weights_only=True)``; a directory holding
    another run's files is refused on resume (and overwritten when not resuming). Stage images are
    ``.npy`` files beside a fingerprinted marker (:meth:`saved_images`). Only the ``writer`` (rank 0
    of a job) writes or deletes; every rank reads.
    """

    #: the stage-image files this class writes (and deletes when a run starts afresh)
    IMAGES = ("stage1_images",)

    def __init__(self, directory: str | Path | None, fingerprint: str, config: dict[str, Any],
                 resume: bool, writer: bool = True) -> None:
        self.dir = Path(directory) if directory else None
        self.fingerprint = fingerprint
        self.resume = resume
        self.writer = writer
        if self.dir is None:
            if resume:
                raise UserError("resume=True needs a checkpoint_dir")
            return
        meta = self.dir / "run.json"
        if resume and meta.exists():
            try:
                old = json.loads(meta.read_text())
            except (OSError, ValueError) as e:
                raise UserError(f"unreadable checkpoint metadata: {e}", meta) from None
            if old.get("fingerprint") != fingerprint:
                why = ("another configuration" if old.get("config") != config
                       else "other input data (images or labels differ)")
                raise UserError(f"checkpoint belongs to {why}; refusing to resume (delete it or drop --resume)",
                                self.dir)
        if not writer:
            return
        if not resume and self.dir.exists():
            for pattern in ("*.epoch.pt", "*.done.pt", *(f"{n}.npy" for n in self.IMAGES)):  # only ours
                for f in self.dir.glob(pattern):
                    f.unlink()
        write_json(meta, {"fingerprint": fingerprint, "config": config})

    def _load(self, name: str) -> dict[str, Any] | None:
        if self.dir is None or not self.resume:
            return None
        path = self.dir / name
        if not path.exists():
            return None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file is the user's problem, said in one line
            raise UserError(f"unreadable checkpoint: {type(e).__name__}: {e}", path) from None
        if state.get("fingerprint") != self.fingerprint:
            raise UserError("checkpoint belongs to another configuration or dataset; refusing to resume", path)
        return state

    def _save(self, name: str, state: dict[str, Any]) -> None:
        if self.dir is None or not self.writer:
            return
        with atomic_path(self.dir / name) as tmp:
            try:
                torch.save({"fingerprint": self.fingerprint, **state}, tmp)
            except RuntimeError as e:  # torch's zip writer reports a short write (full disk) this way
                raise UserError(f"could not write checkpoint (disk full?): {str(e).splitlines()[0]}",
                                self.dir / name) from None

    def epoch_state(self, stage: str) -> dict[str, Any] | None:
        return self._load(f"{stage}.epoch.pt")

    def save_epoch(self, stage: str, state: dict[str, Any]) -> None:
        self._save(f"{stage}.epoch.pt", state)

    def stage_output(self, stage: str) -> dict[str, Any] | None:
        return self._load(f"{stage}.done.pt")

    def save_stage_output(self, stage: str, state: dict[str, Any]) -> None:
        self._save(f"{stage}.done.pt", state)
        if self.dir is not None and self.writer:
            (self.dir / f"{stage}.epoch.pt").unlink(missing_ok=True)

    def images_path(self, name: str) -> Path | None:
        return None if self.dir is None else self.dir / f"{name}.npy"

    def saved_images(self, name: str, shape: tuple[int, ...]) -> np.ndarray | None:
        """A finished stage's images (read-only memmap) when resuming this very run, else None."""
        marker, path = self.stage_output(name), self.images_path(name)
        if marker is None or path is None or not path.is_file():
            return None
        arr = open_array(path)
        if tuple(arr.shape) != tuple(shape) or arr.dtype != np.uint8:
            raise UserError(f"checkpoint images have shape {arr.shape}, expected {shape}; refusing to resume", path)
        return arr

    def mark_images(self, name: str, shape: tuple[int, ...]) -> None:
        self.save_stage_output(name, {"shape": list(shape)})


# --- the shared training loop --------------------------------------------------------------------
def use_channels_last(width: int, device: torch.device | str = "cuda") -> bool:
    """channels_last on CUDA; on CPU only for narrow models (see :func:`unpoison.accel.dvae_channels_last`)."""
    return dvae_channels_last(width, device)


def dvae_accel(cfg: DVAEConfig, device: torch.device | str) -> Accel:
    """The default switches for ``cfg`` on ``device``: :meth:`Accel.auto` with the config's compile / batch."""
    return Accel.auto(device, "dvae", cfg.width, compile={"yes": True, "no": False}.get(cfg.compile),
                      infer_batch=cfg.infer_batch or None)


def compile_stacks(model: nn.Module) -> None:
    """``torch.compile`` the conv stacks (encoder and decoders) in place; the small 1x1 heads stay eager."""
    for name in ("encoder", "decoder", "perturbation_decoder"):
        sub = getattr(model, name, None)
        if sub is not None and getattr(sub, "_compiled_call_impl", None) is None:
            sub.compile()


def _float_batch(x_u8: torch.Tensor, fmt: torch.memory_format = torch.channels_last) -> torch.Tensor:
    return x_u8.float().div_(255).contiguous(memory_format=fmt)


def _noise_generator(seed: int, epoch: int, ctx: DistContext, dev: torch.device) -> torch.Generator:
    """A rank's own sampling generator for one epoch (a function of seed, epoch and rank: resumes exactly)."""
    g = torch.Generator(device=dev)
    g.manual_seed(int.from_bytes(hashlib.sha256(f"{seed}/{epoch}/{ctx.rank}".encode()).digest()[:8], "little"))
    return g


def train_autoencoder(model: nn.Module, loss_fn: Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]],
                      x_u8: torch.Tensor | BatchSource, y: torch.Tensor | None, cfg: DVAEConfig, kld_limit: float,
                      stage: str, seed: int, ckpt: Checkpointer, progress: bool = True,
                      callback: EpochCallback | None = None, accel: Accel | None = None,
                      dist: DistContext = SINGLE) -> list[dict[str, float]]:
    """Train ``model`` in place on uint8 NCHW ``x_u8`` (a device tensor or a :class:`BatchSource`); return
    per-epoch history. ``accel`` picks the speed switches (default :func:`dvae_accel`); the model is put in
    its memory format.

    The permutation comes from a generator seeded ``seed`` (saved in the checkpoint), the latent samples
    from one generator per epoch and rank (a function of seed, epoch and rank), so a resident and a
    streamed source see the same batches and samples, and a resumed run continues exactly. Several
    processes (``dist``): every rank uses rank 0's permutation, takes its part of each global batch of
    ``cfg.batch_size``, and DDP averages gradients, each rank's loss weighted by its share of the batch.
    """
    src = x_u8 if isinstance(x_u8, BatchSource) else ResidentSource(x_u8)
    dev = src.device
    accel = accel or dvae_accel(cfg, dev)
    model.to(memory_format=accel.memory_format)
    n = len(src)
    steps = math.ceil(n / cfg.batch_size)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr, fused=accel.fused_adam)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * steps, eta_min=0.0)
    gen = torch.Generator(device=dev)
    gen.manual_seed(seed)
    history: list[dict[str, float]] = []
    start = 0
    state = ckpt.epoch_state(stage)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if "rng_state" in state:
            rng.restore(state["rng_state"], {"data": gen}, ckpt.dir)
        else:  # a checkpoint from before RNG states were all saved: the data generator only
            gen.set_state(state["rng"])
        history = list(state["history"])
        start = int(state["epoch"])
    fwd: nn.Module = model
    if accel.compile:
        compile_stacks(model)
    if dist.active:  # rank 0's initial weights are broadcast; BatchNorm statistics stay per rank (DDP's default)
        fwd = nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    is_dvae = isinstance(model, DVAE)
    fmt = accel.memory_format
    variational = isinstance(model, (DVAE, RateConstrainedVAE))
    total = cfg.epochs * steps
    bar = tqdm(total=total, initial=start * steps, desc=stage, disable=not progress, leave=False,
               dynamic_ncols=True)
    try:
        for ep in range(start, cfg.epochs):
            model.train()
            perm = dist.broadcast_(torch.randperm(n, device=dev, generator=gen))
            noise = _noise_generator(seed, ep, dist, dev)
            sums = torch.zeros(4, device=dev, dtype=torch.float64)  # loss, rec, kld, count
            t0 = time.perf_counter()
            for i, (idx, x_b) in enumerate(src.batches(shard_batches(perm, cfg.batch_size, dist.rank, dist.world))):
                weight = 1.0
                if dist.active:  # this rank's share of the global batch (0 for an empty share: a dummy image)
                    weight = len(idx) * dist.world / min(cfg.batch_size, n - i * cfg.batch_size)
                    if len(idx) == 0:
                        idx = perm[i * cfg.batch_size:i * cfg.batch_size + 1]
                        x_b = src.take(idx)
                xb = _float_batch(x_b, fmt)
                with accel.autocast(dev):
                    if is_dvae:
                        out = fwd(xb, y[idx], sample=True, generator=noise)  # type: ignore[index]
                    elif variational:
                        out = fwd(xb, sample=True, generator=noise)
                    else:
                        out = fwd(xb)
                loss, parts = loss_fn(xb.float(), out, kld_weight=cfg.kld_weight, kld_limit=kld_limit)
                opt.zero_grad(set_to_none=True)
                (loss * weight if weight != 1.0 else loss).backward()
                nn.utils.clip_grad_norm_(params, cfg.grad_clip, foreach=True)
                opt.step()
                sched.step()
                b = len(idx) if weight else 0
                sums += torch.stack([loss.detach().double() * b, parts["rec"].double() * b,
                                     parts.get("kld", torch.zeros((), device=dev)).double() * b,
                                     torch.tensor(float(b), device=dev, dtype=torch.float64)])
                bar.update(1)
                if progress and (i % 20 == 0 or i == steps - 1):
                    s = (sums[:3] / sums[3]).tolist()
                    bar.set_description(f"{stage} epoch {ep + 1}/{cfg.epochs}")
                    bar.set_postfix(loss=f"{s[0]:.4f}", kld=f"{s[2]:.2f}",
                                    psnr=f"{-10 * math.log10(max(s[1], 1e-10)):.1f}")
            s = (dist.all_reduce_sum_(sums)[:3] / sums[3]).tolist()
            check_finite_loss(s[0], f"D-VAE {stage}", ep + 1)  # before the epoch is checkpointed
            rec = {"epoch": ep + 1, "loss": s[0], "rec_mse": s[1], "psnr": -10 * math.log10(max(s[1], 1e-10)),
                   "kld": s[2], "lr": sched.get_last_lr()[0], "time_s": time.perf_counter() - t0}
            history.append(rec)
            ckpt.save_epoch(stage, {"epoch": ep + 1, "model": model.state_dict(), "optimizer": opt.state_dict(),
                                    "scheduler": sched.state_dict(), "rng_state": rng.capture({"data": gen}),
                                    "history": history})
            if callback is not None:
                callback({"stage": stage, **rec})
    finally:
        bar.close()
    model.eval()
    return history


Sink = TensorSink | NpySink
#: per batch: (model outputs, float input batch) -> named float results
InferFn = Callable[[dict[str, torch.Tensor], torch.Tensor], dict[str, torch.Tensor]]


@torch.no_grad()
def _infer_to(model: nn.Module, x: BatchSource, y: torch.Tensor | None, accel: Accel, fn: InferFn,
              sinks: dict[str, tuple[Sink, Callable[[torch.Tensor], torch.Tensor]]],
              dist: DistContext = SINGLE, keys: tuple[str, ...] | None = None) -> None:
    """Batched inference with ``z = mu`` (``accel.infer_batch`` images a batch); each named result of ``fn``
    is converted and put into its sink. ``keys``: the model outputs ``fn`` reads (None: all); a D-VAE then
    runs only what they need (:func:`_dvae_outputs`).

    Batches are ``[i, i + batch)`` whatever the number of ranks (whole batches dealt to ranks), so each
    row's bytes do not depend on how the work was shared. Non-finite results end every rank with
    :class:`NonFiniteError` (NaN would round to 0 and pass as images)."""
    model.eval()
    dev = x.device
    fmt = accel.memory_format
    bad = torch.zeros((), dtype=torch.bool, device=dev)
    per_class = None
    if isinstance(model, DVAE) and keys == ("p_hat",) and model.p_input == "class":
        with accel.autocast(dev):
            per_class = model.class_perturbations()  # p_hat depends on the label only: one pass per class
    for start, x_b in x.ranges(shard_ranges(len(x), accel.infer_batch, dist.rank, dist.world)):
        xb = _float_batch(x_b, fmt)
        yb = None if y is None else y[start:start + len(xb)]
        with accel.autocast(dev):
            out = _dvae_outputs(model, xb, yb, keys, per_class) if isinstance(model, DVAE) else model(xb)
        for name, res in fn({k: v.float() for k, v in out.items()}, xb).items():
            bad |= ~torch.isfinite(res).all()  # no sync per batch
            sink, convert = sinks[name]
            sink.put(start, convert(res))
    if dist.any(bool(bad), dev):
        raise NonFiniteError("the trained model's output is not finite (NaN/inf); nothing was written "
                             "(a smaller --lr may help)")


def _dvae_outputs(model: DVAE, xb: torch.Tensor, yb: torch.Tensor | None, keys: tuple[str, ...] | None,
                  per_class: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The inference outputs ``keys`` of a D-VAE, computing no more than they need: ``x_hat`` alone skips
    ``D_p`` and ``logvar``; a class-only ``p_hat`` is a gather from ``per_class`` (no encoder pass)."""
    if keys == ("x_hat",):
        return {"x_hat": model.reconstruct(xb)}
    if keys == ("p_hat",) and per_class is not None and yb is not None:
        return {"p_hat": per_class[yb]}
    return model(xb, yb)


@torch.no_grad()
def _infer(model: nn.Module, x_u8: torch.Tensor | BatchSource, y: torch.Tensor | None, accel: Accel,
           fn: Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor],
           keys: tuple[str, ...] | None = None) -> torch.Tensor:
    """Batched inference with ``z = mu`` into one device tensor; ``fn(out, x)`` picks the float result
    (from the model outputs ``keys``; None: all)."""
    src = x_u8 if isinstance(x_u8, BatchSource) else ResidentSource(x_u8)
    sink = TensorSink(len(src))
    _infer_to(model, src, y, accel, lambda o, xb: {"r": fn(o, xb)}, {"r": (sink, _same)}, keys=keys)
    return sink.result()


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _to_u8(x01: torch.Tensor) -> torch.Tensor:
    return x01.clamp(0, 1).mul(255).round().to(torch.uint8)


def _nhwc(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.permute(0, 2, 3, 1).cpu().numpy())


class _AutoencoderPurifier(Purifier):
    """Shared plumbing: config from a preset, device, seed, checkpoints, labels, geometry checks, and the
    choice between the resident and the streamed path (``memory_budget``; ``stream`` forces it)."""

    COMMON = frozenset({"device", "seed", "progress", "preset"})
    learns = True
    supports_checkpoint = True
    supports_streaming = True
    #: copies of the uint8 split the resident path holds at its peak (transform: x0..x3 on the device, two
    #: stage arrays, float16 p_hat (two copies' worth) and the output on the host); measured in
    #: docs/results/stream_scale.md. A split streams when this many copies exceed the memory budget.
    RESIDENT_FACTOR = 10.0

    def __init__(self, preset: str = "paper", device: str | torch.device = "auto", seed: int = 0,
                 progress: bool = True, checkpoint_dir: str | Path | None = None, resume: bool = False,
                 epoch_callback: EpochCallback | None = None, accel: Accel | None = None,
                 memory_budget: str | int | None = None, stream: bool | None = None,
                 scratch_dir: str | Path | None = None, dist: DistContext | None = None, **overrides: Any) -> None:
        preset = DVAE_PRESETS.resolve(preset, device)
        super().__init__(preset=preset, seed=seed, **{k: v for k, v in overrides.items() if v is not None})
        self.config = DVAEConfig.preset(preset, **overrides)
        self.device = device  # as given; the device a fit runs on is ``device_``
        #: speed switches as given (None: this config's defaults on ``device_``, see ``accel_``)
        self.accel = accel
        self.seed = int(seed)
        self.dist = dist or SINGLE
        self.progress = progress and self.dist.main
        self.checkpoint_dir = checkpoint_dir
        self.resume = bool(resume)
        self.epoch_callback = epoch_callback if self.dist.main else None
        self.memory_budget = memory_budget
        self.stream = stream
        self.scratch_dir = scratch_dir
        self.models_: dict[str, nn.Module] = {}
        self.num_classes_: int = 0
        self.history_: dict[str, list[dict[str, float]]] = {}
        self.plan_: dict[str, Any] = {}
        self._tmp: Path | None = None
        self._work: Path | None = None

    @classmethod
    def param_defaults(cls) -> dict[str, str]:
        """Parameters whose default is "the preset's" show each preset's value (``paper 64, cpu 8``)."""
        out = super().param_defaults()
        for k, (_, default, _) in cls.PARAMS.items():
            if default is None and k in DVAEConfig.__dataclass_fields__:
                vals = {p: show_value(getattr(DVAEConfig.preset(p), k)) for p in DVAE_PRESETS.names()}
                same = len(set(vals.values())) == 1
                out[k] = next(iter(vals.values())) if same else ", ".join(f"{p} {v}" for p, v in vals.items())
        return out

    def _start_fit(self) -> None:
        self.device_ = pick_device(self.device)
        #: the speed switches this fit uses (training and inference)
        self.accel_ = self.accel or dvae_accel(self.config, self.device_)

    def _labels(self, y: np.ndarray | None, fitting: bool) -> torch.Tensor | None:
        if y is None:
            return None
        if fitting:
            if len(np.unique(y)) < 2:
                raise UserError(f"{self.name} needs at least two classes in y, got {len(np.unique(y))}")
            if y.min() < 0:
                raise UserError(f"labels must be >= 0, got {y.min()}")
            self.num_classes_ = int(y.max()) + 1
        elif self.num_classes_ and (y.min() < 0 or y.max() >= self.num_classes_):
            raise UserError(f"labels out of range [0, {self.num_classes_}) seen when fitting: "
                            f"[{y.min()}, {y.max()}]")
        return torch.as_tensor(y, device=self.device_)

    def _fingerprint(self, x: np.ndarray, y: np.ndarray | None) -> tuple[str, dict[str, Any]]:
        cfg = {"method": self.name, "seed": self.seed, **asdict(self.config)}
        cfg.pop("infer_batch")
        cfg.pop("compile")
        data = data_fingerprint(x, y) if self.dist.main else None  # one pass over the data, not one per rank
        data = self.dist.broadcast_object(data)
        fp = hashlib.sha256((json.dumps(cfg, sort_keys=True) + data).encode()).hexdigest()
        return fp, cfg

    def _checkpointer(self, fp: str, cfg_json: dict[str, Any]) -> Checkpointer:
        ckpt = Checkpointer(self.checkpoint_dir, fp, cfg_json, self.resume, writer=self.dist.main)
        self.dist.barrier()  # every rank sees the directory rank 0 has prepared
        return ckpt

    def _check_fitted(self) -> None:
        if not self.models_:
            raise UserError(f"{self.name} purifier is not fitted; call fit() first")

    # --- resident or streamed ----------------------------------------------------------------------
    def _plan(self, x: np.ndarray, what: str) -> bool:
        """Whether ``x`` streams (recorded in ``plan_``): forced by ``stream``, else by the memory budget."""
        dev = getattr(self, "device_", None) or pick_device(self.device)  # plan() may run before a fit
        budget = memory_budget(self.memory_budget, dev)
        streamed = self.stream if self.stream is not None else not fits(int(x.nbytes), budget, self.RESIDENT_FACTOR)
        self.plan_ = {"streamed": bool(streamed), "budget_bytes": budget, "images_bytes": int(x.nbytes),
                      "resident_factor": self.RESIDENT_FACTOR, "processes": self.dist.world,
                      "line": plan_line(f"{self.name} {what}", int(x.nbytes), budget, self.RESIDENT_FACTOR,
                                        bool(streamed), forced=self.stream is not None)}
        return bool(streamed)

    def plan(self, x: np.ndarray) -> dict[str, Any]:
        """Whether ``x`` would stream, and the line that says why (the budget against its size)."""
        self._plan(np.asarray(x), "fit")
        return dict(self.plan_)

    def _work_dir(self) -> Path:
        """Where stage images are written as ``.npy`` files: ``checkpoint_dir``, else ``scratch_dir``, else a
        temporary folder of rank 0's (shared with the other ranks by its path) removed by :meth:`close`.

        The first call is collective (rank 0 makes the folder, every rank waits for it): every rank makes
        it at the same point; later calls return the same path without communicating."""
        if self._work is not None:
            return self._work
        base = self.checkpoint_dir or self.scratch_dir
        if base:
            if self.dist.main:
                Path(base).mkdir(parents=True, exist_ok=True)
            self.dist.barrier()
            self._work = Path(base)
        else:
            made = tempfile.mkdtemp(prefix="unpoison-dvae-") if self.dist.main else None
            self._work = self._tmp = Path(self.dist.broadcast_object(made))
        return self._work

    #: files ``transform`` writes into :meth:`_work_dir` when streaming (removed by :meth:`close`)
    OUTPUTS = ("x1", "p_hat", "x2", "purified")

    def close(self) -> None:
        """Remove what streamed ``transform`` wrote (its temporary folder, or its files in the checkpoint
        folder); arrays it returned become invalid. Checkpoints stay."""
        if self.dist.main:
            if self._tmp is not None:
                shutil.rmtree(self._tmp, ignore_errors=True)
            elif self.checkpoint_dir or self.scratch_dir:
                for name in self.OUTPUTS:
                    (Path(self.checkpoint_dir or self.scratch_dir) / f"{name}.npy").unlink(missing_ok=True)  # type: ignore[arg-type]
        self._tmp = self._work = None

    @contextlib.contextmanager
    def _npy_output(self, path: Path, shape: tuple[int, ...], dtype: Any) -> Iterator[NpySink]:
        """A sink every rank writes its rows into; ``path`` appears (atomically, by rank 0) once all are done."""
        ctx = self.dist
        if not ctx.main:
            made = ctx.broadcast_object(None)
            if made is None:
                raise UserError("rank 0 could not create the stage output; see its message", path)
            sink = NpySink(NpyWriter.open(made))
            try:
                yield sink
            finally:
                sink.close()
            ctx.barrier()  # rows of every rank written and flushed
            ctx.barrier()  # rank 0 has put the file in place
            return
        with atomic_path(path) as tmp:
            try:
                NpyWriter.create(tmp, shape, dtype).close()
            except OSError:
                ctx.broadcast_object(None)
                raise
            ctx.broadcast_object(str(tmp))
            sink = NpySink(NpyWriter.open(tmp))
            try:
                yield sink
            finally:
                sink.close()
            ctx.barrier()
        ctx.barrier()

    @contextlib.contextmanager
    def _outputs(self, specs: dict[str, Any], shape: tuple[int, ...],
                 files: bool) -> Iterator[dict[str, TensorSink | NpySink]]:
        """One sink per name: device tensors (resident), or ``.npy`` files in :meth:`_work_dir` (streamed)."""
        with contextlib.ExitStack() as stack:
            if files:
                d = self._work_dir()
                yield {k: stack.enter_context(self._npy_output(d / f"{k}.npy", shape, dt)) for k, dt in specs.items()}
            else:
                yield {k: TensorSink(shape[0]) for k in specs}

    def _result(self, sink: TensorSink | NpySink, name: str) -> np.ndarray | torch.Tensor:
        """A finished output: the device tensor (resident) or the file's read-only memmap (streamed)."""
        if isinstance(sink, TensorSink):
            return sink.result()
        return open_array(self._work_dir() / f"{name}.npy")

    def _infer_accel(self, hw: tuple[int, ...]) -> Accel:
        """The switches for inference on ``hw`` images: the default batch (256 images on CPU, 1024 on CUDA) is
        sized for 32x32; larger images get as many pixels a batch, not as many images (at 224x224 the
        256-image batch held ~6 GiB of activations on CPU: docs/results/stream_scale.md). A batch given
        (``infer_batch``, or an ``accel``) is kept."""
        if self.accel is not None or self.config.infer_batch:
            return self.accel_
        per = max(1, self.accel_.infer_batch * 32 * 32 // max(1, int(hw[0]) * int(hw[1])))
        return self.accel_.with_(infer_batch=min(self.accel_.infer_batch, per))

    def _discard(self, name: str, files: bool) -> None:
        """Remove a streamed intermediate (x1, x2) once no rank reads it: disk holds fewer copies of the set."""
        if files and self.dist.main and self._work is not None:
            (self._work / f"{name}.npy").unlink(missing_ok=True)

    def _source(self, x: np.ndarray | torch.Tensor, streamed: bool) -> BatchSource:
        return make_source(x, self.device_, stream=streamed)

    def _psnr(self, a: BatchSource, b: BatchSource) -> float:
        """PSNR (dB) between two uint8 sources, accumulated batch by batch (every rank its share)."""
        sse = torch.zeros(2, dtype=torch.float64, device=self.device_)
        ranges = shard_ranges(len(a), self._infer_accel(a.hwc).infer_batch, self.dist.rank, self.dist.world)
        for (_, xa), (_, xb) in zip(a.ranges(ranges), b.ranges(ranges)):
            d = (xa.double() - xb.double()) / 255.0
            sse += torch.stack([d.pow(2).sum(), torch.tensor(float(d.numel()), dtype=torch.float64,
                                                              device=self.device_)])
        total, count = self.dist.all_reduce_sum_(sse).tolist()
        return psnr_from_mse(total / max(count, 1.0))

    def _fit_stage(self, stage: str, make: Callable[[], nn.Module], loss_fn: Callable[..., Any],
                   x_u8: torch.Tensor | BatchSource, y: torch.Tensor | None, kld_limit: float, ckpt: Checkpointer,
                   offset: int, kld_weight: float = 0.0) -> nn.Module:
        done = ckpt.stage_output(stage)
        with rng_scope(self.seed * 1000 + offset, self.device_):  # weight init; training draws use a generator
            model = make().to(self.device_, memory_format=self.accel_.memory_format)
        if done is not None:
            model.load_state_dict(done["model"])
            self.history_[stage] = list(done["history"])
            model.eval()
            if self.accel_.compile:
                compile_stacks(model)
        else:
            cfg = replace(self.config, epochs=self.config.epochs_for(len(x_u8)),
                          kld_weight=kld_weight or self.config.kld_weight)
            self.history_[stage] = train_autoencoder(
                model, loss_fn, x_u8, y, cfg, kld_limit, stage, self.seed * 1000 + offset, ckpt,
                self.progress, self.epoch_callback, self.accel_, self.dist)
            ckpt.save_stage_output(stage, {"model": model.state_dict(), "history": self.history_[stage]})
        self.dist.barrier()
        self.models_[stage] = model
        return model

    def _final_losses(self) -> dict[str, dict[str, float]]:
        return {k: h[-1] for k, h in self.history_.items() if h}

    def _info(self, t0: float) -> dict[str, Any]:
        return {"final_losses": self._final_losses(), "config": asdict(self.config), "accel": self.accel_.to_dict(),
                "stream": {k: v for k, v in self.plan_.items() if k != "line"}, "inference_s": time.perf_counter() - t0,
                "device": str(self.device_), **({"distributed": self.dist.describe()} if self.dist.active else {})}


def _nhwc_rows(a: np.ndarray | torch.Tensor, n: int | None = None) -> np.ndarray:
    """NHWC numpy of a device result (all rows) or a memmap's first ``n`` rows (a small in-memory copy)."""
    if isinstance(a, torch.Tensor):
        return _nhwc(a)
    return np.array(a[:n]) if n is not None else a


def _half255(t: torch.Tensor) -> torch.Tensor:
    return t.half()


class DVAEPurifier(_AutoencoderPurifier):
    """Two-stage D-VAE purification (Algorithm 1). ``preset`` = paper | imagenet | cpu."""

    name = "dvae"
    needs_labels = True
    PARAMS = {
        **_COMMON_PARAMS,
        "kld_limit1": (float, None, "stage-1 KLD limit (paper 1.0; imagenet 1.5)"),
        "kld_limit2": (float, None, "stage-2 KLD limit (paper 3.0)"),
        "kld_weight1": (float, None, "stage-1 KLD weight lambda; 0: the stage-2 one (paper 0.01)"),
        "downsample1": (int, None, "stage-1 downsampling factor (paper 2; imagenet 8)"),
        "width1": (int, None, "stage-1 width (0: --width; cpu preset 16)"),
        "p_input": (str, None, "what D_p sees besides u_y: class (default), z (paper text), features (release)"),
        "skip_stage1": (bool, None, "ablation: stage 2 only"),
        "stage2_subtract": (bool, None, "ablation: false -> x3 = x_hat(x1), no subtraction in stage 2"),
    }

    def check_input(self, image_shape: tuple[int, int, int]) -> None:
        h, w, _ = image_shape
        if not self.config.skip_stage1:
            check_geometry(h, w, self.config.downsample1)
        check_geometry(h, w, self.config.downsample2)

    def _make(self, stage: int, c: int, hw: tuple[int, int]) -> Callable[[], nn.Module]:
        cfg = self.config
        d = cfg.downsample1 if stage == 1 else cfg.downsample2
        width = (cfg.width1 or cfg.width) if stage == 1 else cfg.width
        return lambda: DVAE(c, hw, self.num_classes_, width, cfg.latent, d, p_input=cfg.p_input,
                            embedding=cfg.embedding, embed_std=cfg.embed_std)

    def _loss(self) -> Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        cfg = self.config
        return functools.partial(dvae_loss, form=cfg.loss_form, p_cap=cfg.p_cap or None,
                                 rec_weight=cfg.rec_weight, detach_residual=cfg.detach_residual)

    def fit_stage1(self, x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor) -> DVAEPurifier:
        """Fit stage 1 only: detection needs stage 1's ``p_hat``, at half the cost of a full fit."""
        from .base import as_labels, as_uint8_nhwc

        xx = as_uint8_nhwc(x)
        self._fit(xx, as_labels(y, len(xx)), stage1_only=True)
        return self

    def _fit(self, x: np.ndarray, y: np.ndarray | None, stage1_only: bool = False) -> None:
        self._start_fit()
        cfg = self.config
        yt = self._labels(y, fitting=True)
        h, w, c = x.shape[1:]
        if stage1_only and cfg.skip_stage1:
            raise UserError("fit_stage1 with skip_stage1=True: there is no stage 1 to fit")
        self.check_input((h, w, c))
        fp, cfg_json = self._fingerprint(x, y)
        ckpt = self._checkpointer(fp, cfg_json)
        self.models_ = {}
        streamed = self._plan(x, "fit")
        x0 = self._source(x, streamed)
        x1 = x0
        try:
            if not cfg.skip_stage1:
                m1 = self._fit_stage("stage1", self._make(1, c, (h, w)), self._loss(), x0, yt, cfg.kld_limit1, ckpt, 1,
                                     kld_weight=cfg.kld_weight1)
                if stage1_only:
                    return
                x1 = self._stage1_images(m1, x0, yt, ckpt, streamed, (len(x), h, w, c))
            self._fit_stage("stage2", self._make(2, c, (h, w)), self._loss(), x1, yt, cfg.kld_limit2, ckpt, 2)
        finally:
            x0.close()
            x1.close()

    def _stage1_images(self, m1: nn.Module, x0: BatchSource, yt: torch.Tensor | None, ckpt: Checkpointer,
                       streamed: bool, shape: tuple[int, int, int, int]) -> BatchSource:
        """Stage 2's training images ``x1 = clip(x0 - p_hat(x0))``: resumed from the checkpoint, or computed
        (into the checkpoint folder when there is one, so a killed run need not redo it)."""
        saved = ckpt.saved_images("stage1_images", shape)
        if saved is not None:
            return self._source(saved, streamed)
        path = ckpt.images_path("stage1_images")
        fn: InferFn = lambda o, xb: {"x1": xb - o["p_hat"]}  # noqa: E731
        if path is None and not streamed and not self.dist.active:
            sink = TensorSink(len(x0))
            _infer_to(m1, x0, yt, self._infer_accel(x0.hwc), fn, {"x1": (sink, _to_u8)}, keys=("p_hat",))
            return ResidentSource(sink.result())
        path = path or self._work_dir() / "stage1_images.npy"
        with self._npy_output(path, shape, np.uint8) as out:
            _infer_to(m1, x0, yt, self._infer_accel(x0.hwc), fn, {"x1": (out, _to_u8)}, self.dist, ("p_hat",))
        ckpt.mark_images("stage1_images", shape)
        return self._source(open_array(path), streamed)

    def estimate_perturbation(self, x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor,
                              stage: str = "stage1") -> np.ndarray:
        """``p_hat(x)`` of a fitted stage's D-VAE (float16 NHWC, 0..255 units); detection reuses it."""
        from .base import as_labels, as_uint8_nhwc

        self._check_fitted()
        if stage not in self.models_:
            raise UserError(f"no fitted {stage} (fitted: {', '.join(self.models_)})")
        xx = as_uint8_nhwc(x)
        yy = self._labels(as_labels(y, len(xx)), fitting=False)
        if yy is None:
            raise UserError("estimate_perturbation needs labels y")
        x_u8 = to_device_images(xx, self.device_)
        p = _infer(self.models_[stage], x_u8, yy, self._infer_accel(xx.shape[1:]), lambda o, xb: o["p_hat"] * 255,
                   ("p_hat",))
        return _nhwc(p.half())

    def _transform(self, x: np.ndarray, y: np.ndarray | None) -> np.ndarray:
        self._check_fitted()
        cfg = self.config
        yt = self._labels(y, fitting=False)
        t0 = time.perf_counter()
        streamed = self._plan(x, "transform")
        files = streamed or self.dist.active
        shape = tuple(x.shape)
        keep = None if not files else GRID_ROWS  # rows of each stage kept in memory for the report's grid
        accel = self._infer_accel(x.shape[1:])
        self.stages_, self.extras_ = {}, {}
        self.extra_files_: dict[str, Path] = {}
        psnrs: dict[str, float] = {}
        sources: list[BatchSource] = []

        def source(a: np.ndarray | torch.Tensor) -> BatchSource:
            sources.append(self._source(a, streamed))
            return sources[-1]

        try:
            x0 = x1 = source(x)
            if "stage1" in self.models_:
                with self._outputs({"x1": np.uint8, "p_hat": np.float16}, shape, files) as out:
                    _infer_to(self.models_["stage1"], x0, yt, accel,
                              lambda o, xb: {"x1": xb - o["p_hat"], "p_hat": o["p_hat"] * 255},
                              {"x1": (out["x1"], _to_u8), "p_hat": (out["p_hat"], _half255)}, self.dist,
                              ("p_hat",))
                x1_arr = self._result(out["x1"], "x1")
                self.extras_["p_hat"] = _nhwc_rows(self._result(out["p_hat"], "p_hat"))
                self.stages_["after stage 1"] = _nhwc_rows(x1_arr, keep)
                if files:
                    self.extra_files_ = {"p_hat": self._work_dir() / "p_hat.npy"}
                x1 = source(x1_arr)
                psnrs["stage1_x0_x1"] = self._psnr(x0, x1)
            m2 = self.models_["stage2"]
            x2 = x1
            if cfg.stage2_subtract:
                with self._outputs({"x2": np.uint8}, shape, files) as out:
                    _infer_to(m2, x1, yt, accel, lambda o, xb: {"x2": xb - o["p_hat"]},
                              {"x2": (out["x2"], _to_u8)}, self.dist, ("p_hat",))
                x2_arr = self._result(out["x2"], "x2")
                self.stages_["after stage 2 subtraction"] = _nhwc_rows(x2_arr, keep)
                x2 = source(x2_arr)
                psnrs["stage2_x1_x2"] = self._psnr(x1, x2)  # every rank is done with x1 after its all-reduce
                self._discard("x1", files)
            with self._outputs({"purified": np.uint8}, shape, files) as out:
                _infer_to(m2, x2, yt, accel, lambda o, xb: {"purified": o["x_hat"]},
                          {"purified": (out["purified"], _to_u8)}, self.dist, ("x_hat",))
            x3_arr = self._result(out["purified"], "purified")
            x3 = source(x3_arr)
            psnrs["stage2_x2_x3"] = self._psnr(x2, x3)
            psnrs["total_x0_x3"] = self._psnr(x0, x3)
            self._discard("x2", files)
        finally:
            for s in sources:
                s.close()
        self.info_ = {"psnr_db": psnrs, **self._info(t0), "preset": self.params.get("preset"),
                      "p_hat_units": "0..255 pixel units (float16 NHWC)"}
        return _nhwc_rows(x3_arr)


class _ReconstructionPurifier(_AutoencoderPurifier):
    """One auto-encoder fitted on the images; purification is its reconstruction ``x_hat``."""

    loss_fn: Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]

    def _build(self, c: int, hw: tuple[int, int]) -> nn.Module:
        raise NotImplementedError

    def _limit(self) -> float:
        return 0.0

    def check_input(self, image_shape: tuple[int, int, int]) -> None:
        check_geometry(image_shape[0], image_shape[1], self.config.downsample)

    def _fit(self, x: np.ndarray, y: np.ndarray | None) -> None:
        self._start_fit()
        h, w, c = x.shape[1:]
        self.check_input((h, w, c))
        fp, cfg_json = self._fingerprint(x, None)
        ckpt = self._checkpointer(fp, cfg_json)
        x0 = self._source(x, self._plan(x, "fit"))
        try:
            self._fit_stage(self.name, lambda: self._build(c, (h, w)), type(self).loss_fn, x0, None, self._limit(),
                            ckpt, 1)
        finally:
            x0.close()

    def _transform(self, x: np.ndarray, y: np.ndarray | None) -> np.ndarray:
        self._check_fitted()
        t0 = time.perf_counter()
        streamed = self._plan(x, "transform")
        x0 = self._source(x, streamed)
        try:
            with self._outputs({"purified": np.uint8}, tuple(x.shape), streamed or self.dist.active) as out:
                _infer_to(self.models_[self.name], x0, None, self._infer_accel(x0.hwc),
                          lambda o, xb: {"purified": o["x_hat"]},
                          {"purified": (out["purified"], _to_u8)}, self.dist)
            res = self._result(out["purified"], "purified")
            x3 = self._source(res, streamed)
            try:
                total = self._psnr(x0, x3)
            finally:
                x3.close()
        finally:
            x0.close()
        self.info_ = {"psnr_db": {"total": total}, **self._info(t0)}
        return _nhwc_rows(res)


class VAEPurifier(_ReconstructionPurifier):
    """Reconstruction by the rate-constrained VAE of Eq. 3 (the Fig. 2 ``kld_limit`` sweeps)."""

    name = "vae"
    loss_fn = staticmethod(vae_loss)
    PARAMS = {
        **_COMMON_PARAMS,
        "kld_limit": (float, None, "KLD limit of the rate-constrained VAE (default 1.0)"),
        "downsample": (int, None, "downsampling factor (default 2)"),
    }

    def _build(self, c: int, hw: tuple[int, int]) -> nn.Module:
        cfg = self.config
        return RateConstrainedVAE(c, hw, cfg.width, cfg.latent, cfg.downsample)

    def _limit(self) -> float:
        return self.config.kld_limit


class AEPurifier(_ReconstructionPurifier):
    """Reconstruction by a plain auto-encoder whose bottleneck is its code width (appendix E)."""

    name = "ae"
    loss_fn = staticmethod(ae_loss)
    PARAMS = {
        **_COMMON_PARAMS,
        "bottleneck": (int, None, "AE code channels (default 8; smaller = stronger bottleneck)"),
        "downsample": (int, None, "downsampling factor (default 2)"),
    }

    def _build(self, c: int, hw: tuple[int, int]) -> nn.Module:
        cfg = self.config
        return BottleneckAE(c, hw, cfg.width, cfg.bottleneck, cfg.downsample)


DEFENSES.register("dvae", "two-stage D-VAE purification (the paper's method); presets paper/imagenet/cpu")(
    DVAEPurifier)
DEFENSES.register("vae", "rate-constrained VAE reconstruction (Eq. 3), --kld-limit sweeps")(VAEPurifier)
DEFENSES.register("ae", "plain auto-encoder with a width bottleneck (appendix E)")(AEPurifier)
