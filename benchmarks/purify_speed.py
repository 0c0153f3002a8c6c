"""D-VAE purification speed: images/s of training and inference, product path vs a plain eager reference.

For each preset (``paper`` on 32x32x3, ``cpu`` on 28x28x1) and device (CPU, and CUDA when present)
it times, in the same run:

* product: :func:`unpoison.defenses.dvae.train_autoencoder` (data resident on the device as uint8,
  the switches of :func:`unpoison.defenses.dvae.dvae_accel`: channels_last, bf16 autocast + fused
  Adam + torch.compile on CUDA) and the batched inference;
* reference: the same architecture trained the plain way (fp32, NCHW, a Python loop over batches
  sliced from a CPU float tensor and copied to the device, plain Adam), inference with batch 128.

On CUDA it also times the whole two-stage ``paper`` preset on 50,000 random 32x32x3 images (the
paper's Table 12 setting; skipped on CPU). Writes ``docs/results/purify_speed.md``.

    python benchmarks/purify_speed.py                      # full (see the docstring's README line)
    python benchmarks/purify_speed.py --train-images 256 --infer-images 512 --full-n 0   # smoke
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from unpoison.checkpoints import CheckpointStore
from unpoison.defenses.dvae import (
    DVAEConfig,
    DVAEPurifier,
    _infer,
    compile_stacks,
    dvae_accel,
    train_autoencoder,
)
from unpoison.models import DVAE, dvae_loss
from unpoison.utils import manifest, pick_device, seed_everything, write_json, write_text_atomic

SHAPES = {"paper": (32, 32, 3), "cpu": (28, 28, 1)}


def _data(n: int, hwc: tuple[int, int, int], k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(n, *hwc), dtype=np.uint8), (np.arange(n) % k).astype(np.int64)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def product_train(cfg: DVAEConfig, x: np.ndarray, y: np.ndarray, dev: torch.device) -> float:
    """images/s of one epoch of the product's training loop (after a warm-up epoch on a small slice)."""
    from unpoison.train import to_device_images

    h, w, c = x.shape[1:]
    x_u8 = to_device_images(x, dev)
    yt = torch.as_tensor(y, device=dev)
    ck = CheckpointStore(None, "bench", {}, False)
    model = DVAE(c, (h, w), 10, cfg.width, cfg.latent, cfg.downsample1).to(dev)
    accel = dvae_accel(cfg, dev)
    one = DVAEConfig(**{**cfg.__dict__, "epochs": 1})
    warm = min(len(x_u8), 2 * cfg.batch_size)
    train_autoencoder(model, dvae_loss, x_u8[:warm], yt[:warm], one, cfg.kld_limit1, "warm-up", 0, ck, False,
                      accel=accel)
    _sync(dev)
    t0 = time.perf_counter()
    train_autoencoder(model, dvae_loss, x_u8, yt, one, cfg.kld_limit1, "bench", 0, ck, False, accel=accel)
    _sync(dev)
    return len(x) / (time.perf_counter() - t0)


def product_infer(cfg: DVAEConfig, x: np.ndarray, y: np.ndarray, dev: torch.device) -> float:
    from unpoison.train import to_device_images

    h, w, c = x.shape[1:]
    accel = dvae_accel(cfg, dev)
    model = DVAE(c, (h, w), 10, cfg.width, cfg.latent, cfg.downsample1).to(dev, memory_format=accel.memory_format)
    if accel.compile:
        compile_stacks(model)
    x_u8 = to_device_images(x, dev)
    yt = torch.as_tensor(y, device=dev)
    batch = accel.infer_batch
    _infer(model, x_u8[:batch], yt[:batch], accel, lambda o, xb: o["p_hat"])
    _sync(dev)
    t0 = time.perf_counter()
    _infer(model, x_u8, yt, accel, lambda o, xb: xb - o["p_hat"])
    _sync(dev)
    return len(x) / (time.perf_counter() - t0)


def reference_train(cfg: DVAEConfig, x: np.ndarray, y: np.ndarray, dev: torch.device) -> float:
    """The plain way: fp32 NCHW, batches sliced on the CPU and copied over, plain Adam, eager."""
    h, w, c = x.shape[1:]
    model = DVAE(c, (h, w), 10, cfg.width, cfg.latent, cfg.downsample1).to(dev).train()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, foreach=False)
    xf = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
    yt = torch.from_numpy(y)

    def epoch(n: int) -> None:
        perm = torch.randperm(n)
        for i in range(math.ceil(n / cfg.batch_size)):
            idx = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            xb, yb = xf[idx].to(dev), yt[idx].to(dev)
            out = model(xb, yb, sample=True)
            loss, _ = dvae_loss(xb, out, cfg.kld_weight, cfg.kld_limit1)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()

    epoch(min(len(x), 2 * cfg.batch_size))
    _sync(dev)
    t0 = time.perf_counter()
    epoch(len(x))
    _sync(dev)
    return len(x) / (time.perf_counter() - t0)


@torch.no_grad()
def reference_infer(cfg: DVAEConfig, x: np.ndarray, y: np.ndarray, dev: torch.device) -> float:
    h, w, c = x.shape[1:]
    model = DVAE(c, (h, w), 10, cfg.width, cfg.latent, cfg.downsample1).to(dev).eval()
    xf = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
    yt = torch.from_numpy(y)
    _sync(dev)
    t0 = time.perf_counter()
    outs = []
    for i in range(0, len(x), 128):
        xb = xf[i:i + 128].to(dev)
        outs.append((xb - model(xb, yt[i:i + 128].to(dev))["p_hat"]).cpu())
    _sync(dev)
    return len(x) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="cpu,paper")
    ap.add_argument("--devices", default="auto", help="auto = cpu plus cuda when present; or cpu / cuda")
    ap.add_argument("--train-images", type=int, default=0,
                    help="images per timed training epoch (0: 2048 on CPU, 25600 on CUDA)")
    ap.add_argument("--infer-images", type=int, default=0, help="images timed in inference (0: 4096 / 50000)")
    ap.add_argument("--full-n", type=int, default=50000, help="CUDA only: two-stage paper run on N images (0: skip)")
    ap.add_argument("--full-epochs", type=int, default=None, help="epochs per stage of that run (default: 60)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    ap.add_argument("--out", default="docs/results/purify_speed.md")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devs = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) if args.devices == "auto" else \
        args.devices.split(",")
    rows = []
    for d in devs:
        dev = pick_device(d)
        for preset in args.presets.split(","):
            cfg = DVAEConfig.preset(preset)
            n_tr = args.train_images or (25600 if dev.type == "cuda" else 2048)
            n_in = args.infer_images or (50000 if dev.type == "cuda" else 4096)
            x, y = _data(max(n_tr, n_in), SHAPES[preset])
            seed_everything(0)
            r = {"device": str(dev), "preset": preset, "shape": "x".join(map(str, SHAPES[preset])),
                 "train_images": n_tr, "infer_images": n_in}
            r["ref_train"] = reference_train(cfg, x[:n_tr], y[:n_tr], dev)
            r["train"] = product_train(cfg, x[:n_tr], y[:n_tr], dev)
            r["ref_infer"] = reference_infer(cfg, x[:n_in], y[:n_in], dev)
            r["infer"] = product_infer(cfg, x[:n_in], y[:n_in], dev)
            # seconds for the whole two-stage preset on 10,000 images, from the measured rates
            r["est_two_stage_10k_s"] = 2 * cfg.epochs * 10000 / r["train"] + 3 * 10000 / r["infer"]
            rows.append(r)
            print(f"{dev} {preset}: train {r['train']:.0f} img/s (reference {r['ref_train']:.0f}, "
                  f"x{r['train'] / r['ref_train']:.2f}); inference {r['infer']:.0f} img/s "
                  f"(reference {r['ref_infer']:.0f}, x{r['infer'] / r['ref_infer']:.2f})", flush=True)
    full = None
    if "cuda" in devs and args.full_n:
        x, y = _data(args.full_n, (32, 32, 3))
        p = DVAEPurifier(preset="paper", epochs=args.full_epochs, device="cuda", progress=True)
        t0 = time.perf_counter()
        p.fit_purify(x, y)
        torch.cuda.synchronize()
        full = {"n": args.full_n, "epochs": p.config.epochs, "seconds": time.perf_counter() - t0,
                "gpu": torch.cuda.get_device_name(0)}
        print(f"two-stage paper preset on {args.full_n} x 32x32x3: {full['seconds']:.0f} s", flush=True)
    load = os.getloadavg()
    lines = ["# D-VAE purification speed", "",
             f"`{' '.join(['python', 'benchmarks/purify_speed.py'] + os.sys.argv[1:])}`; torch "
             f"{torch.__version__}, {torch.get_num_threads()} CPU threads; load average at the end "
             f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (a shared machine inflates CPU timings).", "",
             "| device | preset | image | train img/s | reference | speed-up | inference img/s | reference | "
             "speed-up | est. two-stage 10k (s) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['device']} | {r['preset']} | {r['shape']} | {r['train']:.0f} | {r['ref_train']:.0f} | "
                     f"x{r['train'] / r['ref_train']:.2f} | {r['infer']:.0f} | {r['ref_infer']:.0f} | "
                     f"x{r['infer'] / r['ref_infer']:.2f} | {r['est_two_stage_10k_s']:.0f} |")
    lines += ["", "Reference: same D-VAE, fp32, NCHW, batches sliced from a CPU tensor and copied each step, "
              "plain Adam, eager; inference batch 128. Product: `train_autoencoder` / batched inference "
              "(uint8 data on the device, channels_last; bf16 autocast, fused Adam, torch.compile on CUDA).", ""]
    if full:
        lines.append(f"Whole two-stage `paper` preset ({full['epochs']} epochs per stage) on {full['n']} random "
                     f"32x32x3 images on {full['gpu']}: {full['seconds']:.0f} s ({full['seconds'] / 60:.1f} min).")
    else:
        lines.append("Whole two-stage `paper` run on 50,000 x 32x32x3: skipped (no CUDA in this run).")
    write_text_atomic(Path(args.out), "\n".join(lines) + "\n")
    write_json(Path(args.out).with_suffix(".json"), manifest("purify_speed", vars(args), 0, {}, rows=rows, full=full))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
