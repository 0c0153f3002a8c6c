"""What a cell's experiment function works with (:class:`CellContext`): its data (keyed by content), its poison
(cached), its purifier and its scoring config. The purifier and the scoring config are built by
:func:`cell_purifier` and :func:`train_config`, which the check before a grid (:mod:`unpoison.bench.check`)
calls too, so what is checked is what runs.

Poisoned training sets are cached in ``OUTDIR/cache/attacks`` keyed by content: the dataset's digest (a streamed
hash of its images and labels), the subset, the attack's name, bound, parameters, preset, ratio and seed, and the
attack's code version; written atomically and computed once even with parallel workers (a file lock), so a
table's defenses all see the same poison, a rerun never recomputes it, and changed data or attack code never
reuses it. Purifiers that checkpoint get ``OUTDIR/cells/<id>/ckpt`` and resume: a killed cell continues where it
stopped. A cell poisons clean data itself, so every purifying cell measures each stage against the clean images
(:func:`unpoison.disentangle.purification_report`) and writes ``residual.png`` (p, p_hat, p - p_hat).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..attacks import ATTACKS
from ..data import ImageDataset, load_dataset
from ..data.fingerprint import dataset_fingerprint
from ..defenses import DEFENSES, Purifier, make_purifier
from ..errors import UserError
from ..outputs import atomic_path
from ..pipeline import PurifyResult, measure_against_clean, poison_dataset, purify_dataset, purify_in_processes
from ..train import TrainConfig, TrainResult, train_classifier
from ..utils import Timer, parse_fraction
from ..viz import save_image_grid
from .grid import Cell, attack_seed, short_hash


# --- data, keyed by content -----------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def load_for_cell(spec: str, n_train: int | None, n_test: int | None, seed: int) -> tuple[ImageDataset, str]:
    """The (subset of the) dataset a cell uses and the content digest of the whole dataset (both splits, streamed,
    never the spec or path; cached per process: callers get the cached object, so they must not change its
    arrays: see :meth:`CellContext.data`)."""
    ds = load_dataset(spec)
    digest = dataset_fingerprint(ds)
    if n_train is not None or n_test is not None:
        ds = ds.subset(n_train, n_test, seed)
    return ds, digest


def subset_args(c: dict[str, Any]) -> tuple[str, int | None, int | None, int]:
    """A cell config's arguments of :func:`load_for_cell`."""
    sub = c.get("subset") or {}
    return str(c["dataset"]), sub.get("n_train"), sub.get("n_test"), int(sub.get("seed", 0))


# --- the builders the cell and the check share -----------------------------------------------------------
def train_config(c: dict[str, Any], **changes: Any) -> TrainConfig:
    """A cell's scoring config: its ``train:`` with the defense entry's ``train:`` on top (preset ``smoke`` unless
    named; the cell's ``model``), then ``changes``."""
    t = {**(c.get("train") or {}), **(c["defense"].get("train") or {})}
    preset = t.pop("preset", "smoke")
    t["model"] = c.get("model") or t.get("model")
    return dataclasses.replace(TrainConfig.preset(preset, **t), **changes)


def cell_purifier(c: dict[str, Any], name: str, params: dict[str, Any], checkpoint_dir: str | Path,
                  dependency_file: str | Path | None, progress: bool = False) -> Purifier:
    """The purifier ``name`` as a cell of config ``c`` builds it: the cell's device and seed, a checkpoint folder
    it resumes from (when it checkpoints), and the file its grid's dependency cell makes (``dependency_file``,
    when its ``params`` name none and the cell has such a dependency)."""
    kw = dict(params)
    dep = DEFENSES.get(name).DEPENDENCY
    if dep is not None and not kw.get(dep.param) and c.get(dep.cell_key) and dependency_file is not None:
        kw[dep.param] = str(dependency_file)
    return make_purifier(name, kw, device=c.get("device", "auto"), seed=int(c.get("seed", 0)), progress=progress,
                         checkpoint_dir=checkpoint_dir, resume=None)


def dependency_file(c: dict[str, Any], name: str, outdir: Path) -> Path | None:
    """The file defense ``name`` reads from its grid's dependency cell (AVATAR's DDPM), if the cell has one."""
    dep = DEFENSES.get(name).DEPENDENCY
    if dep is None or not c.get(dep.cell_key):
        return None
    return outdir / "cells" / c[dep.cell_key] / dep.file


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class CellContext:
    """What an experiment function gets: the cell's config, folders, device, timer, progress flag."""

    def __init__(self, cell: Cell, outdir: Path, progress: bool) -> None:
        self.cell = cell
        self.c = cell.config
        self.outdir = outdir
        self.dir = outdir / "cells" / cell.id
        self.progress = progress
        self.timer = Timer()
        self.seed = int(self.c.get("seed", 0))
        self.device = self.c.get("device", "auto")
        self.digest = cell.data
        self.extra: dict[str, Any] = {}

    # --- data ---------------------------------------------------------------------------------
    def data(self) -> ImageDataset:
        """The cell's data: a private copy (the loaded dataset is cached and shared by the cells of a process)."""
        with self.timer("load"):
            ds, digest = load_for_cell(*subset_args(self.c))
        if self.cell.data and digest != self.cell.data:
            raise UserError(f"dataset {self.c['dataset']!r} changed since the grid was checked (content digest "
                            f"{digest[:12]} != {self.cell.data[:12]}); rerun to recompute")
        self.digest = digest

        def own(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else np.array(a, copy=True)

        return dataclasses.replace(ds, x_train=own(ds.x_train), y_train=own(ds.y_train), x_test=own(ds.x_test),
                                   y_test=own(ds.y_test), classes=list(ds.classes), attrs=dict(ds.attrs))

    # --- attack (cached) ----------------------------------------------------------------------
    def poison(self, ds: ImageDataset, ratio: float | None = None) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """Poisoned copy of the training split, poisoned indices, attack info (from the content-keyed cache)."""
        a = self.c["attack"]
        x = ds.x_train
        ratio = float(ratio if ratio is not None else a.get("ratio", self.c.get("ratio", 1.0)))
        if a["name"] == "none":
            return x, np.zeros(0, dtype=np.int64), {"attack": "none"}
        eps = None if a.get("eps") is None else parse_fraction(a["eps"], "eps")
        seed = attack_seed(self.c)
        kw: dict[str, Any] = dict(a["params"])
        if self.c.get("attack_preset"):
            kw.setdefault("preset", self.c["attack_preset"])
        key = short_hash({"data": self.digest, "subset": self.c.get("subset"), "n": len(x), "attack": a["name"],
                          "eps": eps, "params": kw, "ratio": ratio, "seed": seed,
                          "code": ATTACKS.get(a["name"]).code_version()}, 16)
        cache = self.outdir / "cache" / "attacks"
        path = cache / f"{a['name']}-{key}.npz"
        with self.timer("attack"), _file_lock(cache / f"{a['name']}-{key}.lock"):
            if path.exists():
                with np.load(path, allow_pickle=False) as z:
                    if z["x"].shape == x.shape:
                        self.extra.setdefault("attack_cache", []).append({"path": str(path), "hit": True})
                        return z["x"], z["indices"], json.loads(str(z["info"]))
            checkpoints = ATTACKS.get(a["name"]).supports_checkpoint
            res = poison_dataset(ds, a["name"], {k: v for k, v in kw.items() if k != "preset"}, eps=eps,
                                 ratio=ratio, seed=seed, device=self.device, progress=self.progress,
                                 preset=kw.get("preset", "paper"), checkpoint_dir=cache / f"{a['name']}-{key}.ckpt",
                                 resume=checkpoints)
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                np.savez(f, x=res.x, indices=res.indices, info=np.array(json.dumps(res.info, default=str)))
            self.extra.setdefault("attack_cache", []).append({"path": str(path), "hit": False})
            return res.x, res.indices, res.info

    # --- defenses -----------------------------------------------------------------------------
    def purifier(self, name: str | None = None, params: dict[str, Any] | None = None, sub: str = "purifier") -> Any:
        """A configured purifier with the cell's device/seed/progress and a resumable checkpoint folder."""
        d = self.c["defense"]
        name = name or d["name"]
        return cell_purifier(self.c, name, d["params"] if params is None else params, self.dir / "ckpt" / sub,
                             dependency_file(self.c, name, self.outdir), self.progress)

    def purify(self, ds: ImageDataset, x_p: np.ndarray, idx: np.ndarray, name: str | None = None,
               params: dict[str, Any] | None = None) -> PurifyResult:
        """:func:`unpoison.pipeline.purify_dataset` of the poisoned split ``x_p`` (``idx``: its poisoned rows),
        measured against the clean images with the residual grid; data-parallel when the cell's ``resources``
        give it several GPUs (``num_gpus``) or processes (``nproc``)."""
        d = self.c["defense"]
        name = name or d["name"]
        title = f"{self.c['attack']['label']} / {d['label']}: p, p_hat, p - p_hat"
        res = self.c.get("resources") or {}
        nproc = int(res.get("nproc") or res.get("num_gpus") or 1)
        poisoned = ds.replace(x_train=x_p)
        if nproc > 1 and DEFENSES.get(name).tags.streaming:  # several GPUs: one data-parallel rank each
            with self.timer("purify"):
                out = purify_in_processes(poisoned, name, d["params"] if params is None else params, nproc,
                                          self.dir / "nproc", self.seed, str(self.device))
            with self.timer("measure"):
                out.measured = measure_against_clean(ds.x_train, x_p, out.images, {}, out.p_hat, ds.y_train, idx,
                                                     self.dir / "residual.png", title)
            return out
        return purify_dataset(poisoned, name, purifier=self.purifier(name, params), clean=ds, poisoned_idx=idx,
                              residual_grid=self.dir / "residual.png", grid_title=title, timer=self.timer)

    def train_config(self, **changes: Any) -> TrainConfig:
        """The cell's scoring config (:func:`train_config`)."""
        return train_config(self.c, **changes)

    def train(self, train: ImageDataset, test: ImageDataset | None = None, train_defense: Any = None,
              desc: str = "train", config: TrainConfig | None = None) -> TrainResult:
        with self.timer("train"):
            return train_classifier(train, test, config or self.train_config(), self.seed, self.device,
                                    train_defense, progress=self.progress, desc=desc)

    def save_grid(self, rows: dict[str, np.ndarray], title: str) -> None:
        rows = {k: v for k, v in rows.items() if v is not None and len(v)}
        if rows:
            save_image_grid(rows, self.dir / "grid.png", title=title)
