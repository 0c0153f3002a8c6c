"""One prepared device check: every GPU code path of the product, timed on one GPU in <= 8 minutes.

    python benchmarks/gpu_check.py            # on the GPU: docs/results/gpu/README.md + gpu_check.json
    python benchmarks/gpu_check.py --dry      # CPU, tiny sizes, < 1 minute; writes to a temporary folder

Sections, in this order (each calls the product's own code: ``train_autoencoder`` / ``_infer``,
``DVAEPurifier``, ``train_classifier``, ``make_attack(...).poison``, ``train_diffusion`` /
``AvatarPurifier``, a checkpointed ``DVAEPurifier`` run stopped and resumed):

1. ``env``: torch / CUDA / cuDNN versions, the GPU, TF32 settings, the commit.
2. ``dvae_speed``: D-VAE ``paper`` preset training and inference images/s with the product's switches
   (:func:`unpoison.defenses.dvae.dvae_accel`: bf16, fused Adam, torch.compile, channels_last, batch
   1024 on CUDA) against the same loop with every switch off (fp32, eager, NCHW, batch 256), and the
   product's switches without torch.compile (what compiling adds); peak memory.
3. ``two_stage``: the two-stage ``paper`` purification of 50,000 x 32 x 32 x 3 images, run for a few
   epochs per stage and **extrapolated** to the preset's 60 (first epoch of a stage counted as measured,
   the rest at the later epochs' mean; inference measured).
4. ``scoring``: ResNet-18 scoring-protocol training images/s (batch 128).
5. ``resume``: a checkpointed two-stage run stopped after its first epoch, resumed, compared with an
   uninterrupted run (bit-for-bit on CPU; on a GPU nondeterministic kernels may differ slightly).
6. ``attacks``: one step of each surrogate attack's ``paper`` preset (EM, REM, TAP, SEP on one batch of
   128, NTGA on one block of 4000): the preset with every loop count set to 1.
7. ``avatar``: AVATAR's ``paper`` UNet: training step and sampling (t* = 100) images/s.

Each section fails soft (its error is recorded, the rest run) and runs under a time cap; the whole run
respects ``--budget-s``: a section that would start past the budget is skipped, one that runs over its
cap is interrupted (SIGALRM), and a watchdog ends the process ``--grace-s`` after the budget, writing what
it has. Results are rewritten after every section, so a killed run still leaves them.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unpoison.accel import Accel
from unpoison.attacks import make_attack
from unpoison.checkpoints import CheckpointStore
from unpoison.data import ImageDataset
from unpoison.defenses.avatar import AvatarPurifier, save_checkpoint, train_diffusion
from unpoison.defenses.dvae import (
    DVAEConfig,
    DVAEPurifier,
    _infer,
    dvae_accel,
    train_autoencoder,
)
from unpoison.models import DVAE, dvae_loss
from unpoison.tensors import pick_device
from unpoison.train import TrainConfig, to_device_images, train_classifier
from unpoison.utils import manifest, write_json, write_text_atomic

ROOT = Path(__file__).resolve().parents[1]
FULL_OUT = ROOT / "docs" / "results" / "gpu"


@dataclass(frozen=True)
class Sizes:
    """Every size the check uses, in one place: ``FULL`` for the GPU, ``DRY`` for the CPU rehearsal."""

    image: tuple[int, int, int] = (32, 32, 3)  # H, W, C
    classes: int = 10
    dvae_overrides: dict[str, Any] = field(default_factory=dict)  # over the ``paper`` preset
    dvae_train_n: int = 12800  # images in the timed training epoch
    dvae_infer_n: int = 50000
    two_stage_n: int = 50000
    two_stage_epochs: int = 3  # per stage, measured; extrapolated to the preset's epochs
    scoring_model: str = "resnet18"
    scoring_n: int = 25600
    scoring_epochs: int = 2
    scoring_test_n: int = 1000
    resume_n: int = 2048
    resume_epochs: int = 2
    attack_n: int = 128
    attack_overrides: dict[str, Any] = field(default_factory=dict)  # over each surrogate attack's ``paper``
    ntga_block: int = 4000
    ntga_val: int = 2000
    avatar_preset: str = "paper"
    avatar_train_n: int = 512  # 4 steps of 128 (the first includes set-up)
    avatar_sample_n: int = 256
    avatar_t_star: int = 100
    #: seconds each section may take at most (the budget may cut it shorter)
    caps: dict[str, float] = field(default_factory=lambda: {
        "env": 30, "dvae_speed": 200, "two_stage": 150, "scoring": 75, "resume": 75, "attacks": 90, "avatar": 75})


FULL = Sizes()
DRY = Sizes(image=(16, 16, 3), classes=4, dvae_overrides={"width": 8, "latent": 16, "batch_size": 32},
            dvae_train_n=128, dvae_infer_n=256, two_stage_n=128, two_stage_epochs=2, scoring_n=64,
            scoring_model="tinycnn", scoring_epochs=1, scoring_test_n=32, resume_n=64,
            attack_overrides={"surrogate": "tinycnn"}, resume_epochs=2, attack_n=16, ntga_block=32,
            ntga_val=16, avatar_preset="toy", avatar_train_n=32, avatar_sample_n=8, avatar_t_star=3,
            caps={"env": 30, "dvae_speed": 60, "two_stage": 60, "scoring": 60, "resume": 60, "attacks": 60,
                  "avatar": 60})


class SectionTimeout(Exception):
    """Raised in the main thread by SIGALRM when a section runs past its cap."""


@dataclass
class Ctx:
    """What a section gets: the device, the sizes, a scratch folder, and a dict for partial results."""

    dev: torch.device
    sizes: Sizes
    scratch: Path
    dry: bool
    out: dict[str, Any] = field(default_factory=dict)

    def sync(self) -> None:
        if self.dev.type == "cuda":
            torch.cuda.synchronize()

    def reset_peak(self) -> None:
        if self.dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float | None:
        return torch.cuda.max_memory_allocated() / 2**30 if self.dev.type == "cuda" else None

    def data(self, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Random uint8 images and balanced labels (speed does not depend on content)."""
        rng = np.random.default_rng(seed)
        x = rng.integers(0, 256, size=(n, *self.sizes.image), dtype=np.uint8)
        return x, (np.arange(n) % self.sizes.classes).astype(np.int64)

    def dvae_config(self, **extra: Any) -> DVAEConfig:
        return DVAEConfig.preset("paper", **{**self.sizes.dvae_overrides, **extra})


# --- sections --------------------------------------------------------------------------------------
def sec_env(c: Ctx) -> None:
    o = c.out
    o["torch"] = torch.__version__
    o["python"] = sys.version.split()[0]
    o["platform"] = platform.platform()
    o["cpu_count"] = os.cpu_count()
    o["torch_threads"] = torch.get_num_threads()
    o["device"] = str(c.dev)
    o["dry"] = c.dry
    with contextlib.suppress(Exception):
        o["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                     text=True, timeout=10).stdout.strip() or None
    if c.dev.type == "cuda":
        p = torch.cuda.get_device_properties(c.dev)
        o["gpu"] = p.name
        o["gpu_memory_gib"] = round(p.total_memory / 2**30, 1)
        o["capability"] = f"{p.major}.{p.minor}"
        o["cuda"] = torch.version.cuda
        o["cudnn"] = torch.backends.cudnn.version()
        o["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
        o["tf32_cudnn"] = torch.backends.cudnn.allow_tf32
        o["cudnn_benchmark"] = torch.backends.cudnn.benchmark


def _dvae_train_rate(c: Ctx, cfg: DVAEConfig, accel: Accel, x_u8: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Images/s of one timed epoch of ``train_autoencoder`` after a warm-up of two batches (compiles there)."""
    h, w, ch = c.sizes.image
    torch.manual_seed(0)
    model = DVAE(ch, (h, w), c.sizes.classes, cfg.width, cfg.latent, cfg.downsample1).to(c.dev)
    one = DVAEConfig(**{**asdict(cfg), "epochs": 1})
    ck = CheckpointStore(None, "gpu-check", {}, False)
    warm = min(len(x_u8), 2 * cfg.batch_size)
    t0 = time.perf_counter()
    train_autoencoder(model, dvae_loss, x_u8[:warm], y[:warm], one, cfg.kld_limit1, "warm-up", 0, ck, False,
                      accel=accel)
    c.sync()
    warm_s = time.perf_counter() - t0
    c.reset_peak()
    t0 = time.perf_counter()
    hist = train_autoencoder(model, dvae_loss, x_u8, y, one, cfg.kld_limit1, "timed", 0, ck, False, accel=accel)
    c.sync()
    dt = time.perf_counter() - t0
    out = {"img_s": len(x_u8) / dt, "warmup_s": warm_s, "loss": hist[-1]["loss"], "peak_gib": c.peak_gib()}
    out["model"] = model  # type: ignore[assignment]  # reused for inference, dropped before recording
    return out


def _dvae_infer_rate(c: Ctx, model: torch.nn.Module, accel: Accel, x_u8: torch.Tensor,
                     y: torch.Tensor) -> dict[str, float]:
    b = accel.infer_batch
    warm = b + len(x_u8) % b  # a full batch and the last one's size: compiled before the timed pass
    _infer(model, x_u8[:warm], y[:warm], accel, lambda o, xb: xb - o["p_hat"])
    c.sync()
    c.reset_peak()
    t0 = time.perf_counter()
    _infer(model, x_u8, y, accel, lambda o, xb: xb - o["p_hat"])
    c.sync()
    return {"img_s": len(x_u8) / (time.perf_counter() - t0), "peak_gib": c.peak_gib()}


def sec_dvae_speed(c: Ctx) -> None:
    s = c.sizes
    cfg = c.dvae_config()
    x, y = c.data(max(s.dvae_train_n, s.dvae_infer_n))
    x_u8, yt = to_device_images(x, c.dev), torch.as_tensor(y, device=c.dev)
    c.out["sizes"] = {"train_n": s.dvae_train_n, "infer_n": s.dvae_infer_n, "config": asdict(cfg)}
    product = dvae_accel(cfg, c.dev)
    # reference first (no compile wait); then the product's switches without compile, which tells apart
    # what torch.compile adds (and still gives a number if compiling fails); then the product path itself
    modes = {"reference": Accel.off(), "product_eager": product.with_(compile=False), "product": product}
    if not product.compile:
        del modes["product_eager"]
    for name, accel in modes.items():  # recorded as measured, so a timeout keeps what was done
        c.out[name] = rec = {"accel": accel.to_dict()}
        rec["train"] = _dvae_train_rate(c, cfg, accel, x_u8[:s.dvae_train_n], yt[:s.dvae_train_n])
        model = rec["train"].pop("model")
        rec["infer"] = _dvae_infer_rate(c, model, accel, x_u8[:s.dvae_infer_n], yt[:s.dvae_infer_n])
        del model
    c.out["train_speedup"] = c.out["product"]["train"]["img_s"] / c.out["reference"]["train"]["img_s"]
    c.out["infer_speedup"] = c.out["product"]["infer"]["img_s"] / c.out["reference"]["infer"]["img_s"]


def sec_two_stage(c: Ctx) -> None:
    s = c.sizes
    x, y = c.data(s.two_stage_n, seed=1)
    full_epochs = DVAEConfig.preset("paper").epochs
    pur = DVAEPurifier(preset="paper", device=c.dev, progress=False, seed=0, epochs=s.two_stage_epochs,
                       **s.dvae_overrides)
    c.reset_peak()
    t0 = time.perf_counter()
    pur.fit(x, y)
    c.sync()
    fit_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    pur.purify(x, y)
    c.sync()
    infer_s = time.perf_counter() - t1
    epochs = {k: [h["time_s"] for h in v] for k, v in pur.history_.items()}
    est = fit_s - sum(map(sum, epochs.values())) + infer_s
    for times in epochs.values():
        steady = float(np.mean(times[1:])) if len(times) > 1 else times[0]
        est += times[0] + (full_epochs - 1) * steady
    c.out.update({"n": s.two_stage_n, "epochs_run": s.two_stage_epochs, "epochs_preset": full_epochs,
                  "fit_s": fit_s, "transform_s": infer_s, "epoch_s": epochs, "extrapolated_total_s": est,
                  "peak_gib": c.peak_gib(), "accel": pur.accel_.to_dict(), "psnr_db": pur.info_.get("psnr_db")})


def sec_scoring(c: Ctx) -> None:
    s = c.sizes
    x, y = c.data(s.scoring_n + s.scoring_test_n, seed=2)
    ds = ImageDataset(x[:s.scoring_n], y[:s.scoring_n], x[s.scoring_n:], y[s.scoring_n:])
    warm = ds.replace(x_train=ds.x_train[:min(len(ds.x_train), 1024)], y_train=ds.y_train[:min(len(ds.y_train), 1024)])
    cfg = TrainConfig.preset("paper", model=s.scoring_model, epochs=1)
    train_classifier(warm, config=cfg, seed=0, device=c.dev, progress=False)  # warm-up: cuDNN, allocator
    c.reset_peak()
    cfg = TrainConfig.preset("paper", model=s.scoring_model, epochs=s.scoring_epochs)
    r = train_classifier(ds, config=cfg, seed=0, device=c.dev, progress=False)
    c.out.update({"model": s.scoring_model, "batch": cfg.batch_size, "n_train": s.scoring_n,
                  "epochs": s.scoring_epochs, "img_s": r.images_per_s, "train_time_s": r.train_time_s,
                  "peak_gib": c.peak_gib(), "accel": Accel.auto(c.dev, "classifier").to_dict(),
                  "final_train_loss": r.history[-1]["train_loss"]})


class _Stop(Exception):
    pass


def sec_resume(c: Ctx) -> None:
    s = c.sizes
    x, y = c.data(s.resume_n, seed=3)
    kw = {"preset": "paper", "device": c.dev, "progress": False, "seed": 0, "epochs": s.resume_epochs,
          **s.dvae_overrides}
    ref_p = DVAEPurifier(**kw)
    ref = ref_p.fit_purify(x, y)
    ck = c.scratch / "resume-ckpt"

    def stop(rec: dict[str, Any]) -> None:
        if rec["stage"] == "stage1" and rec["epoch"] == 1:
            raise _Stop

    stopped = False
    try:
        DVAEPurifier(**kw, checkpoint_dir=ck, epoch_callback=stop).fit_purify(x, y)
    except _Stop:
        stopped = True
    seen: list[tuple[str, int]] = []
    res_p = DVAEPurifier(**kw, checkpoint_dir=ck, resume=True,
                         epoch_callback=lambda r: seen.append((r["stage"], r["epoch"])))
    out = res_p.fit_purify(x, y)
    diff = np.abs(out.astype(np.int16) - ref.astype(np.int16))
    loss_gap = max(abs(a["loss"] - b["loss"]) for k in ref_p.history_
                   for a, b in zip(ref_p.history_[k], res_p.history_[k]))
    c.out.update({"stopped_after": "stage1 epoch 1" if stopped else None,
                  "epochs_run_after_resume": [f"{st} {ep}" for st, ep in seen],
                  "bit_exact": bool(np.array_equal(out, ref)), "pixels_differing": float((diff > 0).mean()),
                  "max_pixel_diff": int(diff.max()), "max_loss_diff": loss_gap, "n": s.resume_n})


#: what "one step" means per attack: the ``paper`` preset with these loop counts
ATTACK_STEP: dict[str, dict[str, Any]] = {
    "em": {"rounds": 1, "train_steps": 1, "pgd_steps": 1, "stop_acc": 101.0},
    "rem": {"rounds": 1, "train_steps": 1, "pgd_steps": 1, "stop_acc": 101.0},
    "tap": {"train_epochs": 1, "pgd_steps": 1},
    "sep": {"pgd_steps": 1, "train_epochs": 15},  # 15 SGD steps give the preset's 15 checkpoints
    "ntga": {"pgd_steps": 1},
}


def sec_attacks(c: Ctx) -> None:
    s = c.sizes
    for name, loops in ATTACK_STEP.items():
        n = s.ntga_block if name == "ntga" else s.attack_n
        extra = ({"block_size": s.ntga_block, "val_size": s.ntga_val} if name == "ntga"
                 else {"batch_size": s.attack_n, **s.attack_overrides})
        x, y = c.data(n, seed=4)
        try:
            atk = make_attack(name, seed=0, device=c.dev, progress=False, preset="paper", **loops, **extra)
            c.reset_peak()
            t0 = time.perf_counter()
            atk.poison(x, y)
            c.sync()
            c.out[name] = {"step_s": time.perf_counter() - t0, "images": n, "params": {**loops, **extra},
                           "peak_gib": c.peak_gib()}
        except SectionTimeout:
            raise
        except Exception as e:  # noqa: BLE001 - one attack failing must not hide the others
            c.out[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    failed = [k for k, v in c.out.items() if "error" in v]
    if failed:
        raise RuntimeError(f"attack(s) failed: {', '.join(failed)}")


def sec_avatar(c: Ctx) -> None:
    s = c.sizes
    x, y = c.data(max(s.avatar_train_n, s.avatar_sample_n), seed=5)
    ds = ImageDataset(x[:s.avatar_train_n], y[:s.avatar_train_n])
    c.reset_peak()
    model, cfg, rec = train_diffusion(ds, preset=s.avatar_preset, epochs=1, seed=0, device=c.dev, progress=False)
    c.sync()
    steps = math.ceil(s.avatar_train_n / min(cfg["batch_size"], s.avatar_train_n))
    c.out["train"] = {"preset": s.avatar_preset, "parameters": rec["parameters"], "steps": steps,
                      "batch": cfg["batch_size"], "s_per_step": rec["train_time_s"] / steps,
                      "img_s": s.avatar_train_n / rec["train_time_s"], "peak_gib": c.peak_gib(),
                      "accel": rec.get("accel")}
    ck = c.scratch / "avatar.pt"
    save_checkpoint(ck, cfg, model)
    del model
    pur = AvatarPurifier(str(ck), t_star=s.avatar_t_star, batch_size=s.avatar_sample_n, device=str(c.dev),
                         progress=False)
    c.reset_peak()
    pur.purify(x[:s.avatar_sample_n])
    c.sync()
    t = pur.info_["denoise_time_s"]
    c.out["sample"] = {"t_star": s.avatar_t_star, "images": s.avatar_sample_n, "s": t,
                       "img_s": s.avatar_sample_n / t, "peak_gib": c.peak_gib()}


SECTIONS: dict[str, Callable[[Ctx], None]] = {
    "env": sec_env, "dvae_speed": sec_dvae_speed, "two_stage": sec_two_stage, "scoring": sec_scoring,
    "resume": sec_resume, "attacks": sec_attacks, "avatar": sec_avatar,
}


# --- running under a budget ------------------------------------------------------------------------
def _on_alarm(signum: int, frame: Any) -> None:
    raise SectionTimeout


def run_sections(sections: dict[str, Callable[[Ctx], None]], ctx_for: Callable[[str], Ctx],
                 caps: dict[str, float], deadline: float, on_done: Callable[[dict[str, Any]], None] | None = None,
                 min_start_s: float = 3.0) -> dict[str, Any]:
    """Run each section with its cap (cut to the deadline); record ok / failed / timeout / skipped.

    A failing section records its error (type, message, the last traceback lines) and the rest go on.
    ``on_done(results)`` is called after every section (the caller rewrites its files there).
    """
    results: dict[str, Any] = {}
    use_alarm = threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGALRM")
    old = signal.signal(signal.SIGALRM, _on_alarm) if use_alarm else None
    try:
        for name, fn in sections.items():
            left = deadline - time.monotonic()
            cap = min(float(caps.get(name, left)), left)
            if left < min_start_s:
                results[name] = {"status": "skipped", "why": f"time budget ({max(left, 0):.0f} s left)",
                                 "seconds": 0.0, "results": {}}
                if on_done:
                    on_done(results)
                continue
            ctx = ctx_for(name)
            t0 = time.monotonic()
            rec: dict[str, Any] = {"status": "ok", "cap_s": round(cap, 1)}
            try:
                if use_alarm:
                    signal.setitimer(signal.ITIMER_REAL, cap)
                fn(ctx)
            except SectionTimeout:
                rec.update(status="timeout", error=f"stopped after its cap of {cap:.0f} s")
            except Exception as e:  # noqa: BLE001 - fail soft: record and go on
                tb = traceback.format_exc().strip().splitlines()
                rec.update(status="failed", error=f"{type(e).__name__}: {str(e)[:500]}", traceback=tb[-6:])
            finally:
                if use_alarm:
                    signal.setitimer(signal.ITIMER_REAL, 0)
            rec["seconds"] = round(time.monotonic() - t0, 2)
            rec["results"] = ctx.out
            results[name] = rec
            if on_done:
                on_done(results)
    finally:
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
    return results


# --- report ----------------------------------------------------------------------------------------
def _f(v: Any, fmt: str = "{:,.0f}") -> str:
    return "-" if v is None else fmt.format(v)


def summary_rows(res: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(section, status, headline numbers, seconds) per section, for the printed and Markdown table."""
    rows = []
    for name, rec in res.items():
        r = rec.get("results", {})
        st = rec["status"]
        note = ""
        try:
            if name == "env":
                note = f"{r.get('gpu') or r.get('device')}; torch {r.get('torch')}, CUDA {r.get('cuda') or '-'}"
            elif name == "dvae_speed":
                parts = []
                for mode in ("product", "product_eager", "reference"):
                    m = r.get(mode, {})
                    tr, inf = m.get("train", {}), m.get("infer", {})
                    if tr:
                        parts.append(f"{mode}: train {_f(tr.get('img_s'))} img/s (peak "
                                     f"{_f(tr.get('peak_gib'), '{:.1f}')} GiB, warm-up {tr['warmup_s']:.0f} s), "
                                     f"infer {_f(inf.get('img_s'))} img/s")
                if "infer_speedup" in r:
                    parts.append(f"speed-up train x{r['train_speedup']:.2f}, infer x{r['infer_speedup']:.2f}")
                note = "; ".join(parts)
            elif name == "two_stage" and "extrapolated_total_s" in r:
                est = r["extrapolated_total_s"]
                note = (f"{r['n']:,} images, {r['epochs_run']} epochs/stage measured in "
                        f"{r['fit_s'] + r['transform_s']:.0f} s; EXTRAPOLATED to {r['epochs_preset']} epochs/stage: "
                        f"{est:.0f} s ({est / 60:.1f} min); peak {_f(r['peak_gib'], '{:.1f}')} GiB")
            elif name == "scoring" and "img_s" in r:
                note = (f"{r['model']} batch {r['batch']}: {_f(r['img_s'])} training img/s, "
                        f"peak {_f(r['peak_gib'], '{:.1f}')} GiB")
            elif name == "resume" and "bit_exact" in r:
                note = (f"stopped after {r['stopped_after']}, resumed ran {', '.join(r['epochs_run_after_resume'])}; "
                        f"bit-exact: {r['bit_exact']} (pixels differing {r['pixels_differing']:.2%}, "
                        f"max loss diff {r['max_loss_diff']:.2g})")
            elif name == "attacks":
                note = "; ".join(f"{k} {v['step_s']:.2f} s" if "step_s" in v else f"{k} FAILED" for k, v in r.items())
            elif name == "avatar" and "train" in r:
                t, smp = r["train"], r.get("sample")
                note = (f"{t['preset']} UNet {t['parameters'] / 1e6:.1f}M: {t['s_per_step']:.3f} s/step "
                        f"(batch {t['batch']})")
                if smp:
                    note += f"; sampling t*={smp['t_star']}: {smp['img_s']:,.1f} img/s"
        except (KeyError, TypeError, ValueError) as e:
            note = f"(summary unavailable: {type(e).__name__})"
        if st != "ok":
            note = (f"{st.upper()}: {rec.get('error') or rec.get('why', '')} " + note).strip()
        rows.append((name, st, note, f"{rec['seconds']:.1f}"))
    return rows


def targets(res: dict[str, Any], dry: bool) -> list[str]:
    """The issue's GPU targets, met or not (only meaningful on a GPU)."""
    if dry:
        return ["Targets: not applicable (dry run on CPU at tiny sizes; numbers only test the code paths)."]
    out = []
    r = res.get("two_stage", {}).get("results", {})
    v = r.get("extrapolated_total_s")
    out.append("- two-stage `paper` purification of 50,000 x 32x32x3 <= 180 s: "
               + ("not measured" if v is None else f"{v:.0f} s extrapolated -> {'met' if v <= 180 else 'NOT met'}"))
    r = res.get("dvae_speed", {}).get("results", {})
    for k in ("train_speedup", "infer_speedup"):
        v = r.get(k)
        out.append(f"- D-VAE product path >= 2x eager fp32 ({k.split('_')[0]}): "
                   + ("not measured" if v is None else f"x{v:.2f} -> {'met' if v >= 2 else 'NOT met'}"))
    v = res.get("scoring", {}).get("results", {}).get("img_s")
    out.append("- ResNet-18 scoring protocol >= 10,000 training img/s: "
               + ("not measured" if v is None else f"{v:,.0f} -> {'met' if v >= 10000 else 'NOT met'}"))
    return out


def render(res: dict[str, Any], meta: dict[str, Any]) -> str:
    rows = summary_rows(res)
    lines = [f"# Device check{' (DRY RUN, CPU, tiny sizes)' if meta['dry'] else ''}", "",
             f"`{meta['command']}` on {meta['device_name']}, {meta['date']}; budget {meta['budget_s']:.0f} s, "
             f"total {meta['total_s']:.0f} s.", "",
             "| section | status | result | s |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c.replace('|', '/')} | {d} |" for a, b, c, d in rows]
    lines += ["", *targets(res, meta["dry"]), "",
              "Product path: the switches of `unpoison.accel.Accel.auto` for the device (on CUDA: bf16 autocast, "
              "fused Adam, torch.compile of the D-VAE conv stacks, channels_last, inference batch 1024). "
              "Reference: the same loop with every switch off (`Accel.off()`: fp32, eager, NCHW, batch 256). "
              "The two-stage time is EXTRAPOLATED from the epochs run (see gpu_check.json for every number).", ""]
    return "\n".join(lines)


def print_table(res: dict[str, Any]) -> None:
    rows = summary_rows(res)
    w = [max(len(r[i]) for r in rows + [("section", "status", "result", "s")]) for i in range(4)]
    w[2] = min(w[2], 150)
    print(f"{'section':<{w[0]}}  {'status':<{w[1]}}  {'s':>{w[3]}}  result")
    for a, b, c, d in rows:
        print(f"{a:<{w[0]}}  {b:<{w[1]}}  {d:>{w[3]}}  {c}")


# --- main ------------------------------------------------------------------------------------------
def default_out(dry: bool) -> Path:
    """docs/results/gpu for a device run; a fresh temporary folder for a dry run (never the results)."""
    return Path(tempfile.mkdtemp(prefix="gpu-check-dry-")) if dry else FULL_OUT


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry", action="store_true", help="CPU, tiny sizes, same code (CI's rehearsal)")
    ap.add_argument("--out", default=None, help="output folder (default: docs/results/gpu; --dry: a temp folder)")
    ap.add_argument("--budget-s", type=float, default=None, help="whole-run budget (default 420; --dry 60)")
    ap.add_argument("--grace-s", type=float, default=30.0, help="after the budget, the watchdog ends the process")
    ap.add_argument("--device", default=None, help="default: cuda (cpu with --dry)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset, in this order")
    args = ap.parse_args(argv)
    t_start = time.monotonic()
    budget = args.budget_s if args.budget_s is not None else (60.0 if args.dry else 420.0)
    deadline = t_start + budget
    out_dir = Path(args.out) if args.out else default_out(args.dry)
    dev = pick_device(args.device or ("cpu" if args.dry else "cuda"))
    if dev.type == "cpu" and not args.dry:
        print("note: no --dry but running on CPU; full sizes on a CPU will hit the budget", file=sys.stderr)
    names = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(names) - set(SECTIONS))
    if unknown:
        print(f"error: unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    sizes = DRY if args.dry else FULL
    if args.dry:
        torch.set_num_threads(1)
    scratch = Path(tempfile.mkdtemp(prefix="gpu-check-scratch-"))
    command = shlex.join(["python", "benchmarks/gpu_check.py", *(sys.argv[1:] if argv is None else argv)])
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    lock = threading.Lock()
    state: dict[str, Any] = {"results": {}}

    def write(results: dict[str, Any], final: bool = False) -> None:
        with lock:
            state["results"] = results
            meta = {"command": command, "dry": args.dry, "device_name": device_name, "budget_s": budget,
                    "total_s": time.monotonic() - t_start, "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                    "complete": final}
            out_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(out_dir / "README.md", render(results, meta))
            write_json(out_dir / "gpu_check.json", manifest(
                "gpu_check", {"sizes": asdict(sizes), "sections": names, **vars(args)}, 0,
                {k: v["seconds"] for k, v in results.items()}, meta=meta, sections=results))

    def watchdog() -> None:
        left = deadline + args.grace_s - time.monotonic()
        if left > 0:
            time.sleep(left)
        with contextlib.suppress(Exception):
            res = dict(state["results"])
            res["watchdog"] = {"status": "timeout", "seconds": 0.0, "results": {},
                               "error": f"process ended {args.grace_s:.0f} s after the {budget:.0f} s budget"}
            write(res)
        print(f"gpu_check: budget exceeded; results so far in {out_dir}", file=sys.stderr, flush=True)
        os._exit(124)

    def done(results: dict[str, Any]) -> None:
        write(results)
        name, rec = list(results.items())[-1]
        print(f"  {name}: {rec['status']} ({rec['seconds']:.1f} s)", flush=True)

    threading.Thread(target=watchdog, daemon=True).start()
    print(f"gpu_check{' --dry' if args.dry else ''}: {device_name}, budget {budget:.0f} s, writing {out_dir}",
          flush=True)
    try:
        results = run_sections({n: SECTIONS[n] for n in names}, lambda name: Ctx(dev, sizes, scratch, args.dry),
                               sizes.caps, deadline, on_done=done)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    write(results, final=True)
    print()
    print_table(results)
    print()
    for line in targets(results, args.dry):
        print(line)
    print(f"\nwrote {out_dir / 'README.md'} and {out_dir / 'gpu_check.json'} ({time.monotonic() - t_start:.0f} s)")
    return 0 if all(r["status"] == "ok" for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
