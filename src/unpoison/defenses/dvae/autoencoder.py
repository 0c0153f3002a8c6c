"""What the D-VAE, the VAE and the AE purifiers share: config from a preset, device, seed, checkpoints,
labels, and the choice between the resident and the streamed path (``memory_budget``; ``stream`` forces it).

**Larger than memory.** When a split times :attr:`AutoencoderPurifier.RESIDENT_FACTOR` does not fit the memory
budget (``memory_budget``; see :mod:`unpoison.stream`), training reads shuffled batches from disk through a
prefetching :class:`~unpoison.stream.StreamedSource`, and every stage writes its images into a ``.npy`` by rows
(:mod:`.staging`); ``purify`` then returns read-only memmaps. The permutation and the batches are the same
as on the resident path, so the result is the same, bit for bit. **Several processes** (``dist``, from
:func:`unpoison.distributed.init` under ``torchrun``): each stage trains data-parallel (DDP; each rank reads
its share of every global batch of ``batch_size``), rank 0 writes the checkpoints, and inference deals whole
batches to ranks, which write disjoint rows of the same files.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ...accel import Accel
from ...checkpoints import CheckpointStore
from ...data.fingerprint import content_fingerprint
from ...distributed import SINGLE, DistContext
from ...errors import UserError
from ...presets import show_value
from ...stream import BatchSource, fits, make_source, memory_budget, plan_line, shard_ranges
from ...tags import Tags
from ...tensors import pick_device, rng_scope
from ...utils import psnr_from_mse
from ..base import Purifier
from .config import DVAE_PRESETS, DVAEConfig
from .engine import EpochCallback, InferFn, _infer_to, _nhwc, compile_stacks, dvae_accel, train_autoencoder
from .staging import Staging

#: images of each intermediate stage kept in ``stages_`` when streaming (the report's grid shows 8)
GRID_ROWS = 8


def data_fingerprint(x: np.ndarray, y: np.ndarray | None) -> str:
    """The resume key's data part: the one streamed content fingerprint (bounded memory on memmaps)."""
    return content_fingerprint(x, None if y is None else np.asarray(y).astype(np.int64, copy=False))


class AutoencoderPurifier(Purifier):
    """Shared plumbing: config from a preset, device, seed, checkpoints, labels, geometry checks, and the
    choice between the resident and the streamed path (``memory_budget``; ``stream`` forces it)."""

    COMMON = frozenset({"device", "seed", "progress", "preset"})
    tags = Tags(learns=True, checkpoint=True, streaming=True)
    #: copies of the uint8 split the resident path holds at its peak (purify: x0..x3 on the device, two
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
        #: where stage images go (device tensors, or files in checkpoint_dir / scratch_dir / a temporary folder)
        self.staging = Staging(self.dist, checkpoint_dir, scratch_dir, self.OUTPUTS)

    @classmethod
    def param_defaults(cls) -> dict[str, str]:
        """Parameters whose default is "the preset's" show each preset's value (``paper 64, cpu 8``)."""
        out = super().param_defaults()
        for k, prm in cls.PARAMS.items():
            if prm.default is None and k in DVAEConfig.__dataclass_fields__:
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

    def _checkpointer(self, fp: str, cfg_json: dict[str, Any]) -> CheckpointStore:
        ckpt = CheckpointStore(self.checkpoint_dir, fp, cfg_json, self.resume, writer=self.dist.main)
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

    #: files ``purify`` writes into the work folder when streaming (removed by :meth:`close`)
    OUTPUTS = ("x1", "p_hat", "x2", "purified")

    def close(self) -> None:
        """Remove what streamed ``purify`` wrote (its temporary folder, or its files in the checkpoint
        folder); arrays it returned become invalid. Checkpoints stay."""
        self.staging.close()

    def _infer_accel(self, hw: tuple[int, ...]) -> Accel:
        """The switches for inference on ``hw`` images: the default batch (256 images on CPU, 1024 on CUDA) is
        sized for 32x32; larger images get as many pixels a batch, not as many images (at 224x224 the
        256-image batch held ~6 GiB of activations on CPU: docs/results/stream_scale.md). A batch given
        (``infer_batch``, or an ``accel``) is kept."""
        if self.accel is not None or self.config.infer_batch:
            return self.accel_
        per = max(1, self.accel_.infer_batch * 32 * 32 // max(1, int(hw[0]) * int(hw[1])))
        return self.accel_.with_(infer_batch=min(self.accel_.infer_batch, per))

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
                   x_u8: torch.Tensor | BatchSource, y: torch.Tensor | None, kld_limit: float, ckpt: CheckpointStore,
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


    def _pass(self, model: nn.Module, x: BatchSource, y: torch.Tensor | None, fn: InferFn,
              specs: dict[str, tuple[Any, Callable[[torch.Tensor], torch.Tensor]]], files: bool,
              shape: tuple[int, ...], keys: tuple[str, ...] | None = None) -> dict[str, np.ndarray | torch.Tensor]:
        """One inference pass of ``model`` over ``x``: each named result of ``fn`` converted (``specs``: name ->
        (dtype, convert)) into a device tensor, or (``files``) a ``.npy`` file of the work folder. ``keys``: the
        model outputs ``fn`` reads (a D-VAE then computes only those)."""
        with self.staging.outputs_for({k: dt for k, (dt, _) in specs.items()}, shape, files) as out:
            _infer_to(model, x, y, self._infer_accel(x.hwc), fn, {k: (out[k], conv) for k, (_, conv) in specs.items()},
                      self.dist, keys)
        return {k: self.staging.result(out[k], k) for k in specs}


def nhwc_rows(a: np.ndarray | torch.Tensor, n: int | None = None) -> np.ndarray:
    """NHWC numpy of a device result (all rows) or a memmap's first ``n`` rows (a small in-memory copy)."""
    if isinstance(a, torch.Tensor):
        return _nhwc(a)
    return np.array(a[:n]) if n is not None else a
