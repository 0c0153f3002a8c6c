"""The D-VAE training and inference engine: one training loop and one batched inference pass for the
D-VAE, the VAE and the AE, resident or streamed, on one process or data-parallel on several.

Training keeps the whole split on the device as uint8 (or streams it through a
:class:`~unpoison.stream.StreamedSource`); the speed switches (bf16 autocast, fused Adam, ``torch.compile``
of the conv stacks, channels_last, inference batch) come from an :class:`~unpoison.accel.Accel` (default:
:func:`dvae_accel`). Every epoch is checkpointed, RNG states included, so a resumed run continues exactly.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ... import rng
from ...accel import Accel
from ...checkpoints import CheckpointStore
from ...distributed import SINGLE, DistContext
from ...errors import NonFiniteError, check_finite_loss
from ...models.dvae import DVAE, RateConstrainedVAE
from ...stream import BatchSource, ResidentSource, Sink, TensorSink, shard_batches, shard_ranges
from .config import DVAEConfig

EpochCallback = Callable[[dict[str, Any]], None]


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
                      stage: str, seed: int, ckpt: CheckpointStore, progress: bool = True,
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
        rng.restore(state["rng_state"], {"data": gen}, ckpt.dir)
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
        with accel.infer_autocast(dev):
            per_class = model.class_perturbations()  # p_hat depends on the label only: one pass per class
    for start, x_b in x.ranges(shard_ranges(len(x), accel.infer_batch, dist.rank, dist.world)):
        xb = _float_batch(x_b, fmt)
        yb = None if y is None else y[start:start + len(xb)]
        with accel.infer_autocast(dev):
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

