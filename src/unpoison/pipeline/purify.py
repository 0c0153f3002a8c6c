"""``purify_dataset``: build a purifier, fit it, purify the training split, measure it; one function under
the ``purify`` command, the benchmark cells, the demo and the several-process workers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..data import ImageDataset
from ..defenses import Purifier, make_purifier
from ..utils import Timer, psnr
from .measure import measure_against_clean


def _quiet(*_: Any, **__: Any) -> None:
    return None


@dataclass
class PurifyResult:
    """What a purification produced: the images, each stage's, stage 1's ``p_hat``, the purifier's record
    (per-stage PSNR, losses, plan), the measurements against the clean images, timings."""

    #: the input with its training split purified (uint8 NHWC; read-only memmap when streamed)
    dataset: ImageDataset
    method: str
    #: the parameters the purifier was built with (its ``get_params()``)
    params: dict[str, Any]
    #: named intermediate batches (``after stage 1``, ...; the first rows only when streamed)
    stages: dict[str, np.ndarray]
    #: arrays worth saving beside the output (D-VAE: ``p_hat``), and the files holding streamed ones
    extras: dict[str, np.ndarray]
    extra_files: dict[str, Path]
    #: the purifier's JSON-able record (``info_``)
    info: dict[str, Any]
    psnr_input_output: float
    #: :func:`~unpoison.pipeline.measure.measure_against_clean` when the clean images were given
    measured: dict[str, Any] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    purifier: Purifier | None = None

    @property
    def images(self) -> np.ndarray:
        return self.dataset.x_train

    @property
    def p_hat(self) -> np.ndarray | None:
        return self.extras.get("p_hat")

    def stats(self) -> dict[str, Any]:
        """What the manifest records under ``stats``."""
        return {"psnr_input_output": self.psnr_input_output, **self.info}

    def close(self) -> None:
        """Remove the files a streamed purification wrote (its returned memmaps become invalid)."""
        if self.purifier is not None and hasattr(self.purifier, "close"):
            self.purifier.close()


def purify_dataset(ds: ImageDataset, method: str = "dvae", params: dict[str, Any] | None = None, *,
                   purifier: Purifier | None = None, preset: str | None = None, device: Any = "auto", seed: int = 0,
                   progress: bool = True, checkpoint_dir: str | Path | None = None, resume: bool = False,
                   memory_budget: str | int | None = None, dist: Any = None, clean: ImageDataset | None = None,
                   poisoned_idx: np.ndarray | None = None, residual_grid: str | Path | None = None,
                   grid_title: str = "", timer: Timer | None = None,
                   say: Callable[..., None] = _quiet) -> PurifyResult:
    """Purify ``ds``'s training split with ``method`` (or a ``purifier`` already built) and measure it.

    ``clean``: the same images before poisoning: every stage is measured against them (``poisoned_idx``: the
    poisoned rows when known) and ``residual_grid`` names the picture of p, p_hat and p - p_hat. ``say``
    gets the lines worth showing (the resident-or-streamed plan). Several processes: ``dist`` (every rank
    calls this; rank 0's result is the one to write)."""
    timer = timer or Timer()
    pur = purifier or make_purifier(method, params, preset=preset, device=device, seed=seed, progress=progress,
                                    checkpoint_dir=checkpoint_dir, resume=resume, memory_budget=memory_budget,
                                    dist=dist)
    if say is not _quiet and pur.tags.streaming:
        ctx = getattr(pur, "dist", None)
        say(f"{pur.plan(ds.x_train)['line']}" + (f"; {ctx.world} processes ({ctx.backend})" if ctx and ctx.active
                                                else ""))
    with timer("purify"):
        x_out = pur.fit_purify(ds.x_train, ds.y_train)
    res = PurifyResult(ds.replace(x_train=x_out), method, pur.get_params(), dict(pur.stages_), dict(pur.extras_),
                       dict(getattr(pur, "extra_files_", {}) or {}), dict(pur.info_), psnr(ds.x_train, x_out),
                       timings=timer.times, purifier=pur)
    if clean is not None:
        with timer("measure"):
            res.measured = measure_against_clean(clean.x_train, ds.x_train, x_out, res.stages, res.p_hat, ds.y_train,
                                                 subset=poisoned_idx, grid=residual_grid, title=grid_title)
    return res
