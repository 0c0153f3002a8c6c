"""Run one benchmark cell: load data -> attack (cached) -> purify or train-time defense -> evaluate.

Every cell writes ``OUTDIR/cells/<id>/manifest.json`` (and an image grid for purifying cells) and
returns a record ``{status, results, manifest, timings, error}`` that the driver puts in the store.
Poisoned training sets are cached per (dataset, subset, attack, bound, params, ratio, seed) in
``OUTDIR/cache/attacks`` (written atomically, computed once even with parallel workers thanks to a
file lock), so a table's defenses all see the same poison and a rerun never recomputes it.
Purifiers that checkpoint get ``OUTDIR/cells/<id>/ckpt`` with ``resume=True``: a killed cell
continues where it stopped.

``kind`` selects the experiment (:data:`KINDS`): ``purify`` (Tables 2, 5, 6, 13, Fig. 2/6),
``disentangle`` (Table 1), ``detect`` (Table 7), ``partial`` (Table 8), ``amplify`` (Sec. 5.2),
``theorem2`` (the numerical check of Theorem 2).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .._registry import Registry
from ..data import ImageDataset, load_dataset
from ..utils import Timer, atomic_path, manifest, parse_fraction, psnr, write_json
from .grid import Cell, import_plugins, short_hash

KindFn = Callable[["CellContext"], dict[str, Any]]
#: experiment functions, selected by a cell's ``kind``
KINDS: Registry[KindFn] = Registry("cell kind")


def attack_registry() -> Registry | None:
    """The attack registry, or ``None`` while ``unpoison.attacks`` is not installed."""
    try:
        from ..attacks import ATTACKS
    except ImportError:
        return None
    return ATTACKS


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
        self.extra: dict[str, Any] = {}

    # --- data ---------------------------------------------------------------------------------
    def data(self) -> ImageDataset:
        sub = self.c.get("subset") or {}
        with self.timer("load"):
            return _load(str(self.c["dataset"]), sub.get("n_train"), sub.get("n_test"), int(sub.get("seed", 0)))

    # --- attack (cached) ----------------------------------------------------------------------
    def poison(self, ds: ImageDataset, ratio: float | None = None, x: np.ndarray | None = None,
               y: np.ndarray | None = None, tag: str = "") -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """Poisoned copy of ``x`` (default: the training split), poisoned indices, attack info."""
        a = self.c["attack"]
        x = ds.x_train if x is None else x
        y = ds.y_train if y is None else y
        ratio = float(ratio if ratio is not None else a.get("ratio", self.c.get("ratio", 1.0)))
        if a["name"] == "none":
            return x, np.zeros(0, dtype=np.int64), {"attack": "none"}
        key = short_hash({"dataset": self.c["dataset"], "subset": self.c.get("subset"), "attack": a["name"],
                          "eps": a.get("eps"), "params": a["params"], "ratio": ratio, "seed": self.seed,
                          "preset": self.c.get("attack_preset"), "tag": tag, "n": len(x)}, 16)
        cache = self.outdir / "cache" / "attacks"
        path = cache / f"{a['name']}-{key}.npz"
        with self.timer("attack"), _file_lock(cache / f"{a['name']}-{key}.lock"):
            if path.exists():
                with np.load(path, allow_pickle=False) as z:
                    self.extra.setdefault("attack_cache", []).append({"path": str(path), "hit": True})
                    return z["x"], z["indices"], json.loads(str(z["info"]))
            from ..attacks import make_attack

            eps = None if a.get("eps") is None else parse_fraction(a["eps"], "eps")
            kw: dict[str, Any] = dict(a["params"])
            if self.c.get("attack_preset"):
                kw["preset"] = self.c["attack_preset"]
            atk = make_attack(a["name"], eps=eps, seed=self.seed, device=self.device, progress=self.progress, **kw)
            if getattr(atk, "supports_checkpoint", False):
                atk.checkpoint_dir, atk.resume = str(cache / f"{a['name']}-{key}.ckpt"), True
            res = atk.poison(x, y, ratio=ratio)
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                np.savez(f, x=res.x, indices=res.indices, info=np.array(json.dumps(res.info, default=str)))
            self.extra.setdefault("attack_cache", []).append({"path": str(path), "hit": False})
            return res.x, res.indices, res.info

    # --- defenses -----------------------------------------------------------------------------
    def purifier(self, name: str | None = None, params: dict[str, Any] | None = None, sub: str = "purifier") -> Any:
        """A configured purifier with the cell's device/seed/progress and a resumable checkpoint folder."""
        from ..defenses import DEFENSES, make_purifier

        d = self.c["defense"]
        name = name or d["name"]
        cls = DEFENSES.get(name)
        kw = dict(d["params"] if params is None else params)
        common = {"device": self.device, "seed": self.seed, "progress": self.progress}
        kw.update({k: v for k, v in common.items() if k in cls.COMMON and k not in kw})
        if cls.supports_checkpoint:
            kw["checkpoint_dir"] = str(self.dir / "ckpt" / sub)
            kw["resume"] = True
        return make_purifier(name, **kw)

    def train_config(self) -> Any:
        from ..train import TrainConfig

        t = dict(self.c.get("train") or {})
        preset = t.pop("preset", "smoke")
        t["model"] = self.c.get("model") or t.get("model")
        cfg = TrainConfig.preset(preset, **{k: v for k, v in t.items() if k != "flip"})
        if "flip" in t:
            cfg.flip = bool(t["flip"])
        return cfg

    def train(self, train: ImageDataset, test: ImageDataset | None = None, train_defense: Any = None,
              desc: str = "train") -> Any:
        from ..train import train_classifier

        with self.timer("train"):
            return train_classifier(train, test, self.train_config(), self.seed, self.device, train_defense,
                                    progress=self.progress, desc=desc)

    def save_grid(self, rows: dict[str, np.ndarray], title: str) -> None:
        from ..viz import save_image_grid

        rows = {k: v for k, v in rows.items() if v is not None and len(v)}
        if rows:
            save_image_grid(rows, self.dir / "grid.png", title=title)


# --- caching helpers ---------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _load(spec: str, n_train: int | None, n_test: int | None, seed: int) -> ImageDataset:
    ds = load_dataset(spec)
    if n_train is not None or n_test is not None:
        ds = ds.subset(n_train, n_test, seed)
    return ds


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _acc_on(model: Any, x: np.ndarray, y: np.ndarray) -> float:
    from ..train import predict, to_device_images

    dev = next(model.parameters()).device
    p = predict(model, to_device_images(x, dev)).cpu().numpy()
    return float((p == y).mean() * 100) if len(y) else float("nan")


# --- experiment kinds --------------------------------------------------------------------------------------
@KINDS.register("purify", "attack -> pre-training purifier or training-time defense -> clean test accuracy")
def kind_purify(ctx: CellContext) -> dict[str, Any]:
    ds = ctx.data()
    x_p, idx, ainfo = ctx.poison(ds)
    d = ctx.c["defense"]
    out: dict[str, Any] = {"attack_info": ainfo, "n_poisoned": int(len(idx)), "psnr_attack": psnr(ds.x_train, x_p)}
    x_train, train_defense = x_p, None
    from ..defenses import DEFENSES

    if d["name"] != "none" and d["name"] in DEFENSES:
        res = ctx.c.get("resources") or {}
        nproc = int(res.get("nproc") or res.get("num_gpus") or 1)
        if nproc > 1 and DEFENSES.get(d["name"]).supports_streaming:  # several GPUs: one data-parallel rank each
            from ..distributed import purify_in_processes

            with ctx.timer("purify"):
                x_mm, info = purify_in_processes(d["name"], d["params"], x_p, ds.y_train, nproc, ctx.dir / "nproc",
                                                    ctx.seed, str(ctx.device))
            x_train, stages = np.array(x_mm), {}  # a cell's set is small: in memory for its PSNRs and grid
        else:
            pur = ctx.purifier()
            with ctx.timer("purify"):
                x_train = pur.fit_purify(x_p, ds.y_train)
            info, stages = pur.info_, pur.stages_
        out["defense_info"] = info
        out["psnr"] = psnr(x_p, x_train)
        out["psnr_clean"] = psnr(ds.x_train, x_train)
        from ..viz import residual_image

        ctx.save_grid({"clean": ds.x_train, "poisoned": x_p, **stages, "purified": x_train,
                       "residual": residual_image(x_p, x_train)},
                      f"{ctx.c['attack']['label']} / {d['label']}: PSNR {out['psnr']:.2f} dB")
    elif d["name"] != "none":
        from ..defenses import make_train_defense

        train_defense = make_train_defense(d["name"], **d["params"])
    elif len(idx):
        from ..viz import residual_image

        ctx.save_grid({"clean": ds.x_train, "poisoned": x_p, "residual": residual_image(x_p, ds.x_train)},
                      f"{ctx.c['attack']['label']}: PSNR {out['psnr_attack']:.2f} dB")
    res = ctx.train(ds.replace(x_train=x_train), train_defense=train_defense, desc=ctx.cell.key[-40:])
    out.update(final_acc=res.final_acc, best_acc=res.best_acc, best_epoch=res.best_epoch,
               per_class_acc=res.per_class_acc, images_per_s=res.images_per_s)
    return out


def _p_hat(ctx: CellContext, x: np.ndarray, y: np.ndarray, x_apply: np.ndarray | None = None,
           y_apply: np.ndarray | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    from ..detect import stage1_p_hat

    d = ctx.c["defense"]
    name = d["name"] if d["name"] != "none" else "dvae"
    with ctx.timer("stage1"):
        return stage1_p_hat(x, y, purifier=name, params=d["params"], x_apply=x_apply, y_apply=y_apply,
                            device=ctx.device, seed=ctx.seed, progress=ctx.progress,
                            checkpoint_dir=str(ctx.dir / "ckpt" / "stage1"))


def _add(x: np.ndarray, p_hat: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x.astype(np.float32) + p_hat), 0, 255).astype(np.uint8)


@KINDS.register("disentangle", "Table 1: clean + D-VAE's p_hat still poisons (acc on clean train/test, poisoned)")
def kind_disentangle(ctx: CellContext) -> dict[str, Any]:
    ds = ctx.data()
    x_p, idx, ainfo = ctx.poison(ds)
    p_hat, info = _p_hat(ctx, x_p, ds.y_train)
    x_hat = _add(ds.x_train, p_hat)
    res = ctx.train(ds.replace(x_train=x_hat), desc="train on clean + p_hat")
    out = {"attack_info": ainfo, "stage1_info": info, "final_acc": res.final_acc,
           "acc_clean_train": _acc_on(res.model, ds.x_train, ds.y_train), "acc_clean_test": res.final_acc,
           "acc_poisoned_train": _acc_on(res.model, x_p, ds.y_train),
           "p_hat_l2": float(np.sqrt(((p_hat / 255.0) ** 2).reshape(len(p_hat), -1).sum(1)).mean()),
           "psnr": psnr(ds.x_train, x_hat)}
    from ..viz import residual_image

    ctx.save_grid({"clean": ds.x_train, "poisoned": x_p, "clean + p_hat": x_hat,
                   "p_hat": residual_image(x_hat, ds.x_train)}, f"{ctx.c['attack']['label']}: disentangled p_hat")
    return out


def detection_metrics(flags: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Accuracy, recall, precision, F1 of boolean ``flags`` against boolean ``truth`` (poisoned = True)."""
    tp = float(np.sum(flags & truth))
    fp = float(np.sum(flags & ~truth))
    fn = float(np.sum(~flags & truth))
    acc = float(np.mean(flags == truth)) if len(truth) else float("nan")
    rec = tp / (tp + fn) if tp + fn else float("nan")
    prec = tp / (tp + fp) if tp + fp else float("nan")
    f1 = 2 * prec * rec / (prec + rec) if prec == prec and rec == rec and prec + rec else float("nan")
    return {"det_acc": acc, "recall": rec, "precision": prec, "f1": f1}


def _detect(ctx: CellContext, ds: ImageDataset, x_p: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    from ..detect import detect_poison

    p = ctx.c.get("params") or {}
    d = ctx.c["defense"]
    with ctx.timer("detect"):
        res = detect_poison(x_p, ds.y_train, purifier=p.get("detector", "dvae"),
                            params=p.get("detector_params", d["params"] if d["name"] == "dvae" else {}),
                            train_config=ctx.train_config(), seed=ctx.seed, device=ctx.device,
                            progress=ctx.progress, checkpoint_dir=str(ctx.dir / "ckpt" / "detect"))
    return res.flags, res.info


@KINDS.register("detect", "Table 7: flag poisoned samples from D-VAE's stage-1 p_hat (acc, recall, precision, F1)")
def kind_detect(ctx: CellContext) -> dict[str, Any]:
    ds = ctx.data()
    x_p, idx, ainfo = ctx.poison(ds, ratio=float(ctx.c.get("ratio", 1.0)))
    flags, info = _detect(ctx, ds, x_p)
    truth = np.zeros(len(x_p), dtype=bool)
    truth[idx] = True
    return {"attack_info": ainfo, "detect_info": info, "n_flagged": int(flags.sum()), "n_poisoned": int(len(idx)),
            **detection_metrics(flags, truth)}


@KINDS.register("partial", "Table 8: poison a fraction; detect, then purify only the flagged part (or all)")
def kind_partial(ctx: CellContext) -> dict[str, Any]:
    ds = ctx.data()
    x_p, idx, ainfo = ctx.poison(ds, ratio=float(ctx.c.get("ratio", 1.0)))
    d = ctx.c["defense"]
    detect_first = d["name"] in ((ctx.c.get("params") or {}).get("detect_first_for", ["dvae"]))
    out: dict[str, Any] = {"attack_info": ainfo, "detect_first": detect_first}
    x_train = x_p.copy()
    if d["name"] != "none":
        sel = np.arange(len(x_p))
        if detect_first:
            flags, info = _detect(ctx, ds, x_p)
            truth = np.zeros(len(x_p), dtype=bool)
            truth[idx] = True
            out.update(detect_info=info, **detection_metrics(flags, truth))
            sel = np.flatnonzero(flags)
        if len(sel):
            pur = ctx.purifier()
            # a learning purifier needs >= 2 classes; when the flagged part has one, fit on everything
            fit_idx = sel if len(np.unique(ds.y_train[sel])) > 1 else np.arange(len(x_p))
            out["purifier_fit_on"] = int(len(fit_idx))
            with ctx.timer("purify"):
                pur.fit(x_p[fit_idx], ds.y_train[fit_idx])
                x_train[sel] = pur.transform(x_p[sel], ds.y_train[sel])
            out["defense_info"] = pur.info_
        out["n_purified"] = int(len(sel))
        out["psnr"] = psnr(x_p, x_train)
    res = ctx.train(ds.replace(x_train=x_train))
    out.update(final_acc=res.final_acc, best_acc=res.best_acc, per_class_acc=res.per_class_acc)
    return out


@KINDS.register("amplify", "Sec. 5.2: D-VAE fit on a small poisoned part adds p_hat to the clean rest")
def kind_amplify(ctx: CellContext) -> dict[str, Any]:
    ds = ctx.data()
    ratio = float(ctx.c.get("ratio", 0.01))
    x_p, idx, ainfo = ctx.poison(ds, ratio=ratio)
    rest = np.setdiff1d(np.arange(len(x_p)), idx)
    _, info = None, {}
    p_rest, info = _p_hat(ctx, x_p[idx], ds.y_train[idx], x_apply=ds.x_train[rest], y_apply=ds.y_train[rest])
    x_new = x_p.copy()
    x_new[rest] = _add(ds.x_train[rest], p_rest)
    res = ctx.train(ds.replace(x_train=x_new), desc="train on amplified poison")
    base = ctx.train(ds.replace(x_train=x_p), desc="train on the small poison only")
    return {"attack_info": ainfo, "stage1_info": info, "final_acc": res.final_acc, "best_acc": res.best_acc,
            "acc_small_poison_only": base.final_acc, "n_poisoned": int(len(idx)), "psnr": psnr(ds.x_train, x_new)}


@KINDS.register("theorem2", "Theorem 2: KLD of a normalised two-Gaussian mixture vs its bounds (numerical)")
def kind_theorem2(ctx: CellContext) -> dict[str, Any]:
    from .theorem2 import check_theorem2

    p = ctx.c.get("params") or {}
    with ctx.timer("integrate"):
        return check_theorem2(p.get("r", None))


# --- the worker entry point --------------------------------------------------------------------------------
def run_cell(cell: Cell | dict[str, Any], outdir: str | Path, progress: bool = False,
             threads: int | None = None) -> dict[str, Any]:
    """Run one cell and return its record; never raises for a failing cell (the grid goes on)."""
    if isinstance(cell, dict):
        cell = Cell(**cell)
    outdir = Path(outdir)
    t0 = time.time()
    if threads:
        import torch

        torch.set_num_threads(max(1, int(threads)))
    ctx: CellContext | None = None
    try:
        import_plugins(cell.config.get("plugins") or [])
        ctx = CellContext(cell, outdir, progress)
        ctx.dir.mkdir(parents=True, exist_ok=True)
        fn = KINDS.get(cell.config["kind"])
        results = fn(ctx)
        rec = {"status": "done", "results": results, "timings": ctx.timer.times, "error": None}
    except Exception as e:  # noqa: BLE001 - a failing cell is recorded, the grid goes on
        rec = {"status": "failed", "results": {}, "timings": ctx.timer.times if ctx else {},
               "error": f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=8)}"}
    rec["timings"] = {**rec["timings"], "total": time.time() - t0}
    rec["manifest"] = manifest("bench-cell", {"key": cell.key, **cell.config}, int(cell.config.get("seed", 0)),
                               rec["timings"], status=rec["status"], cell_id=cell.id, pid=os.getpid(),
                               **({"cache": ctx.extra} if ctx else {}))
    rec["manifest"].pop("argv", None)
    with contextlib.suppress(OSError):
        write_json(outdir / "cells" / cell.id / "manifest.json",
                   {**rec["manifest"], "results": rec["results"], "error": rec["error"]})
    return rec
