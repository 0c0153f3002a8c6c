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
import functools
import math
import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unpoison.checkpoints import CheckpointStore
from unpoison.defenses.dvae import (
    DVAEConfig,
    DVAEPurifier,
    _infer,
    _to_u8,
    compile_stacks,
    dvae_accel,
    train_autoencoder,
)
from unpoison.models import DVAE, dvae_loss
from unpoison.tensors import pick_device
from unpoison.utils import manifest, psnr_from_mse, seed_everything, write_json, write_text_atomic

SHAPES = {"paper": (32, 32, 3), "cpu": (28, 28, 1)}


def _data(n: int, hwc: tuple[int, int, int], k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(n, *hwc), dtype=np.uint8), (np.arange(n) % k).astype(np.int64)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def plain_forward(model: DVAE, x: torch.Tensor, y: torch.Tensor, sample: bool = False,
                  generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Fig. 1 written the plain way: every output for every image (``D_p(u_y)`` once per image)."""
    feats = model.encoder(x)
    mu, logvar = model.to_mu(feats), model.to_logvar(feats)
    z = model.sample(mu, logvar, sample, generator)
    u = model.class_embedding[y].expand(-1, -1, *feats.shape[2:])
    return {"x_hat": model.decoder(model.from_z(z)), "p_hat": model.perturbation_decoder(u), "mu": mu,
            "logvar": logvar}


def _model(cfg: DVAEConfig, hwc: tuple[int, int, int], dev: torch.device, seed: int) -> DVAE:
    seed_everything(seed)  # the same initial weights for the product and the reference
    h, w, c = hwc
    return DVAE(c, (h, w), 10, cfg.width, cfg.latent, cfg.downsample1).to(dev)


def product_train(cfg: DVAEConfig, x: np.ndarray, y: np.ndarray, dev: torch.device, seed: int = 0,
                  warm: bool = True) -> tuple[float, dict[str, float], DVAE]:
    """images/s of the product's training loop over ``cfg.epochs`` epochs (after a warm-up epoch on a small
    slice of a throw-away model), its last epoch's losses, and the trained model."""
    from unpoison.train import to_device_images

    x_u8 = to_device_images(x, dev)
    yt = torch.as_tensor(y, device=dev)
    ck = CheckpointStore(None, "bench", {}, False)
    accel = dvae_accel(cfg, dev)
    loss_fn = functools.partial(dvae_loss, detach_residual=cfg.detach_residual)
    if warm:
        one = DVAEConfig(**{**cfg.__dict__, "epochs": 1})
        n = min(len(x_u8), 2 * cfg.batch_size)
        train_autoencoder(_model(cfg, x.shape[1:], dev, seed + 1), loss_fn, x_u8[:n], yt[:n], one, cfg.kld_limit1,
                          "warm-up", 0, ck, False, accel=accel)
    model = _model(cfg, x.shape[1:], dev, seed)
    _sync(dev)
    t0 = time.perf_counter()
    hist = train_autoencoder(model, loss_fn, x_u8, yt, cfg, cfg.kld_limit1, "bench", seed, ck, False, accel=accel)
    _sync(dev)
    return cfg.epochs * len(x) / (time.perf_counter() - t0), hist[-1], model


def reference_train(cfg: DVAEConfig, x: np.ndarray, y: np.ndarray, dev: torch.device, seed: int = 0,
                    warm: bool = True) -> tuple[float, dict[str, float], DVAE]:
    """The plain way: fp32 NCHW, batches sliced on the CPU and copied over, plain Adam, eager, every output for
    every image (:func:`plain_forward`); the same cosine schedule, clipping and loss as the product."""
    xf = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
    yt = torch.from_numpy(y)
    loss_fn = functools.partial(dvae_loss, detach_residual=cfg.detach_residual)

    def train(model: DVAE, n: int, epochs: int) -> dict[str, float]:
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, foreach=False)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * math.ceil(n / cfg.batch_size))
        g = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            perm = torch.randperm(n, generator=g)
            sums = np.zeros(4)
            for i in range(math.ceil(n / cfg.batch_size)):
                idx = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]
                xb, yb = xf[idx].to(dev), yt[idx].to(dev)
                out = plain_forward(model, xb, yb, sample=True)
                loss, parts = loss_fn(xb, out, cfg.kld_weight, cfg.kld_limit1)
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                sched.step()
                sums += len(idx) * np.array([loss.item(), parts["rec"].item(), parts["kld"].item(), 1.0])
        s = sums[:3] / sums[3]
        model.eval()
        return {"loss": s[0], "rec_mse": s[1], "psnr": -10 * math.log10(max(s[1], 1e-10)), "kld": s[2]}

    if warm:
        train(_model(cfg, x.shape[1:], dev, seed + 1), min(len(x), 2 * cfg.batch_size), 1)
    model = _model(cfg, x.shape[1:], dev, seed)
    _sync(dev)
    t0 = time.perf_counter()
    last = train(model, len(x), cfg.epochs)
    _sync(dev)
    return cfg.epochs * len(x) / (time.perf_counter() - t0), last, model


def product_infer(cfg: DVAEConfig, x: np.ndarray, y: np.ndarray, dev: torch.device,
                  model: DVAE | None = None) -> tuple[float, float]:
    """images/s of (a) one inference pass giving ``x_hat`` and ``p_hat`` of every image, and (b) the three
    passes of a two-stage transform (``x1 = x0 - p_hat``, ``x2 = x1 - p_hat``, ``x3 = x_hat(x2)``; one model
    stands for both stages), each as the product runs it (:func:`unpoison.defenses.dvae._infer`)."""
    from unpoison.train import to_device_images

    accel = dvae_accel(cfg, dev)
    model = (model or _model(cfg, x.shape[1:], dev, 0)).to(memory_format=accel.memory_format).eval()
    if accel.compile:
        compile_stacks(model)
    x_u8 = to_device_images(x, dev)
    yt = torch.as_tensor(y, device=dev)
    both = lambda o, xb: o["x_hat"] - o["p_hat"]  # noqa: E731 - needs both outputs
    sub = lambda o, xb: xb - o["p_hat"]  # noqa: E731
    b = accel.infer_batch
    _infer(model, x_u8[:b], yt[:b], accel, both)
    _sync(dev)
    t0 = time.perf_counter()
    _infer(model, x_u8, yt, accel, both)
    _sync(dev)
    one = len(x) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    x1 = _to_u8(_infer(model, x_u8, yt, accel, sub, ("p_hat",)))
    x2 = _to_u8(_infer(model, x1, yt, accel, sub, ("p_hat",)))
    _infer(model, x2, yt, accel, lambda o, xb: o["x_hat"], ("x_hat",))
    _sync(dev)
    return one, len(x) / (time.perf_counter() - t0)


@torch.no_grad()
def reference_infer(cfg: DVAEConfig, x: np.ndarray, y: np.ndarray, dev: torch.device,
                    model: DVAE | None = None) -> tuple[float, float]:
    """The same two measurements the plain way: batches of 128 from a CPU float tensor, every output of
    every image (:func:`plain_forward`), fp32 NCHW."""
    model = (model or _model(cfg, x.shape[1:], dev, 0)).to(memory_format=torch.contiguous_format).eval()
    yt = torch.from_numpy(y)

    def run(xf: torch.Tensor, fn: Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor]) -> torch.Tensor:
        outs = []
        for i in range(0, len(xf), 128):
            xb = xf[i:i + 128].to(dev)
            outs.append(fn(plain_forward(model, xb, yt[i:i + 128].to(dev)), xb).cpu())
        return torch.cat(outs)

    both = lambda o, xb: o["x_hat"] - o["p_hat"]  # noqa: E731
    sub = lambda o, xb: xb - o["p_hat"]  # noqa: E731
    xf = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
    run(xf[:128], both)
    _sync(dev)
    t0 = time.perf_counter()
    run(xf, both)
    _sync(dev)
    one = len(x) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    x1 = _to_u8(run(xf, sub)).float() / 255
    x2 = _to_u8(run(x1, sub)).float() / 255
    run(x2, lambda o, xb: o["x_hat"])
    _sync(dev)
    return one, len(x) / (time.perf_counter() - t0)


def eval_psnr(model: DVAE, x: np.ndarray, y: np.ndarray, dev: torch.device) -> float:
    """PSNR (dB) of the trained image branch, ``x_hat`` with ``z = mu``, over ``x`` (one function for both)."""
    with torch.no_grad():
        xf = torch.from_numpy(x).permute(0, 3, 1, 2).float().div(255).to(dev)
        mse = sum(float((plain_forward(model.eval(), xf[i:i + 256], torch.as_tensor(y[i:i + 256], device=dev))
                         ["x_hat"] - xf[i:i + 256]).pow(2).sum()) for i in range(0, len(x), 256))
    return psnr_from_mse(mse / xf.numel())


def quality(cfg: DVAEConfig, x: np.ndarray, y: np.ndarray, dev: torch.device, seeds: list[int]) -> list[dict]:
    """Final training loss and image-branch PSNR of the product and the reference, same data and initial
    weights, for each seed (the spread over seeds is the noise the product's change must stay within)."""
    rows = []
    for seed in seeds:
        r: dict[str, Any] = {"seed": seed}
        for name, fn in (("reference", reference_train), ("product", product_train)):
            rate, last, model = fn(cfg, x, y, dev, seed, warm=False)
            r[name] = {"img_s": rate, "loss": last["loss"], "train_psnr": last["psnr"], "kld": last["kld"],
                       "eval_psnr": eval_psnr(model, x, y, dev)}
        rows.append(r)
        print(f"quality seed {seed}: " + "; ".join(
            f"{k} loss {r[k]['loss']:.5f} PSNR {r[k]['eval_psnr']:.2f} dB ({r[k]['img_s']:.0f} img/s)"
            for k in ("reference", "product")), flush=True)
    return rows


def _quality_data(n: int) -> tuple[np.ndarray, np.ndarray, str]:
    """The first ``n`` Fashion-MNIST training images when installed (real images: a loss on noise says little)."""
    from unpoison.data import load_dataset

    try:
        ds = load_dataset("fmnist")
        return ds.x_train[:n], ds.y_train[:n].astype(np.int64), "Fashion-MNIST"
    except Exception:  # noqa: BLE001 - no dataset here: random images, said in the table
        x, y = _data(n, SHAPES["cpu"])
        return x, y, "random"


def demo_purify(n: int, seed: int = 0) -> dict[str, Any]:
    """The demo's purification step alone (``unpoison demo``'s [1/4] and [2/4]: a stratified ``n``-image
    Fashion-MNIST subset, LSP-poisoned, purified by the ``cpu`` preset): seconds of ``fit_purify`` and PSNRs."""
    from unpoison.attacks import ATTACKS, make_attack
    from unpoison.data import load_dataset
    from unpoison.defenses import make_purifier
    from unpoison.utils import psnr

    ds = load_dataset("fmnist").subset(n, None, seed=seed)
    atk = make_attack("lsp", seed=seed, device="cpu", progress=False,
                      preset=ATTACKS.get("lsp").presets().resolve("cpu"))
    x_pois = atk.poison(ds.x_train, ds.y_train).x
    pur = make_purifier("dvae", preset="cpu", seed=seed, device="cpu", progress=False)
    t0 = time.perf_counter()
    x_pur = pur.fit_purify(x_pois, ds.y_train)
    secs = time.perf_counter() - t0
    out = {"n": n, "seconds": secs, "threads": torch.get_num_threads(),
           "psnr_purified_vs_clean": psnr(ds.x_train, x_pur),
           "psnr_poisoned_vs_clean": psnr(ds.x_train, x_pois), "final_losses": pur.info_["final_losses"],
           "inference_s": pur.info_["inference_s"]}
    print(f"demo purification step: {secs:.1f} s for {n} images ({out['threads']} threads); PSNR purified vs clean "
          f"{out['psnr_purified_vs_clean']:.2f} dB", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="cpu,paper")
    ap.add_argument("--devices", default="auto", help="auto = cpu plus cuda when present; or cpu / cuda")
    ap.add_argument("--train-images", type=int, default=0,
                    help="images per timed training epoch (0: 2048 on CPU, 25600 on CUDA)")
    ap.add_argument("--infer-images", type=int, default=0, help="images timed in inference (0: 4096 / 50000)")
    ap.add_argument("--quality-seeds", default="", help="cpu preset: seeds of the quality check (e.g. 0,1,2; "
                    "empty: skip), each a whole stage trained by the product and by the reference")
    ap.add_argument("--quality-images", type=int, default=2048, help="Fashion-MNIST images of the quality check")
    ap.add_argument("--quality-steps", type=int, default=0, help="optimizer steps of the quality check "
                    "(0: the cpu preset's)")
    ap.add_argument("--demo-n", type=int, default=0, help="time the demo's purification step on this many images "
                    "(10000 as the demo; 0: skip), with --demo-threads torch threads")
    ap.add_argument("--demo-threads", type=int, default=2)
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
            cfg = replace(DVAEConfig.preset(preset), epochs=1, steps=0)
            n_tr = args.train_images or (25600 if dev.type == "cuda" else 2048)
            n_in = args.infer_images or (50000 if dev.type == "cuda" else 4096)
            x, y = _data(max(n_tr, n_in), SHAPES[preset])
            r = {"device": str(dev), "preset": preset, "shape": "x".join(map(str, SHAPES[preset])),
                 "train_images": n_tr, "infer_images": n_in}
            r["ref_train"] = reference_train(cfg, x[:n_tr], y[:n_tr], dev)[0]
            t0 = time.perf_counter()
            r["train"] = product_train(cfg, x[:n_tr], y[:n_tr], dev)[0]
            r["train_wall_s"] = time.perf_counter() - t0  # warm-up (and any compilation) included
            r["ref_infer"], r["ref_purify"] = reference_infer(cfg, x[:n_in], y[:n_in], dev)
            r["infer"], r["purify"] = product_infer(cfg, x[:n_in], y[:n_in], dev)
            # seconds for the whole two-stage preset on 10,000 images, from the measured rates
            full = DVAEConfig.preset(preset)
            r["est_two_stage_10k_s"] = 2 * full.epochs_for(10000) * 10000 / r["train"] + 10000 / r["purify"]
            rows.append(r)
            print(f"{dev} {preset}: train {r['train']:.0f} img/s (reference {r['ref_train']:.0f}, "
                  f"x{r['train'] / r['ref_train']:.2f}); one inference pass {r['infer']:.0f} img/s "
                  f"(reference {r['ref_infer']:.0f}, x{r['infer'] / r['ref_infer']:.2f}); purification passes "
                  f"{r['purify']:.0f} img/s (reference {r['ref_purify']:.0f}, x{r['purify'] / r['ref_purify']:.2f})",
                  flush=True)
    qual, qsrc = [], ""
    if args.quality_seeds:
        qcfg = DVAEConfig.preset("cpu")
        xq, yq, qsrc = _quality_data(args.quality_images)
        qcfg = replace(qcfg, epochs=replace(qcfg, steps=args.quality_steps or qcfg.steps).epochs_for(len(xq)), steps=0)
        qual = quality(qcfg, xq, yq, pick_device("cpu"), [int(s) for s in args.quality_seeds.split(",")])
    demo = None
    if args.demo_n:
        threads = torch.get_num_threads()
        torch.set_num_threads(args.demo_threads)
        demo = demo_purify(args.demo_n)
        torch.set_num_threads(threads)
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
             f"{torch.__version__}, {torch.get_num_threads()} CPU threads; {time.strftime('%Y-%m-%d %H:%M %Z')}; "
             f"load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (a shared machine inflates "
             "CPU timings; compare within one run).", "",
             "| device | preset | image | train img/s | reference | speed-up | one pass img/s | reference | "
             "speed-up | purification passes img/s | reference | speed-up | timed training incl. warm-up (s) | "
             "est. two-stage 10k (s) |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['device']} | {r['preset']} | {r['shape']} | {r['train']:.0f} | {r['ref_train']:.0f} | "
                     f"x{r['train'] / r['ref_train']:.2f} | {r['infer']:.0f} | {r['ref_infer']:.0f} | "
                     f"x{r['infer'] / r['ref_infer']:.2f} | {r['purify']:.0f} | {r['ref_purify']:.0f} | "
                     f"x{r['purify'] / r['ref_purify']:.2f} | {r['train_wall_s']:.1f} | "
                     f"{r['est_two_stage_10k_s']:.0f} |")
    lines += ["", "Reference (`plain_forward`): the same D-VAE written the plain way, fp32, NCHW, batches sliced from "
              "a CPU tensor and copied each step, plain Adam, eager, every output for every image; inference batch "
              "128. Product: `train_autoencoder` / `_infer` (uint8 data on the device, `Accel.auto`'s switches: "
              "channels_last on CPU at widths 8-32; bf16 autocast, fused Adam, torch.compile on CUDA), the class-only "
              "`D_p(u_y)` run once per class and gathered, and each inference pass computing only the outputs it "
              "uses. 'One pass': `x_hat` and `p_hat` of every image. 'Purification passes': the three passes of a "
              "two-stage transform (`x1 = x0 - p_hat`, `x2 = x1 - p_hat`, `x3 = x_hat(x2)`), one model standing in "
              "for both stages.", ""]
    if qual:
        lines += [f"Quality (cpu preset, one stage at width {qcfg.width}, {qcfg.epochs} epochs of "
                  f"{math.ceil(len(xq) / qcfg.batch_size)} steps on {len(xq)} {qsrc} images, the same initial "
                  "weights; loss and PSNR of the last training epoch, and `eval PSNR`: x_hat with z = mu over "
                  "the same images):", "",
                  "| seed | reference loss | product loss | reference eval PSNR (dB) | product eval PSNR (dB) | "
                  "reference img/s | product img/s |", "|---|---|---|---|---|---|---|"]
        for q in qual:
            a, b = q["reference"], q["product"]
            lines.append(f"| {q['seed']} | {a['loss']:.5f} | {b['loss']:.5f} | {a['eval_psnr']:.2f} | "
                         f"{b['eval_psnr']:.2f} | {a['img_s']:.0f} | {b['img_s']:.0f} |")
        for k in ("loss", "eval_psnr"):
            ref = [q["reference"][k] for q in qual]
            pro = [q["product"][k] for q in qual]
            lines.append(f"\n{k}: reference {np.mean(ref):.5g} (seed spread {np.ptp(ref):.3g}), product "
                         f"{np.mean(pro):.5g} (seed spread {np.ptp(pro):.3g}); mean gap "
                         f"{np.mean(pro) - np.mean(ref):+.3g}.")
        lines.append("")
    if demo:
        lines += [f"Demo purification step (`unpoison demo`'s LSP-poisoned Fashion-MNIST, {demo['n']} images, "
                  f"`cpu` preset, {demo['threads']} torch threads): **{demo['seconds']:.1f} s** (of which inference "
                  f"{demo['inference_s']:.1f} s); PSNR vs clean: poisoned {demo['psnr_poisoned_vs_clean']:.2f} dB, "
                  f"purified {demo['psnr_purified_vs_clean']:.2f} dB; final losses "
                  + ", ".join(f"{k} {v['loss']:.5f}" for k, v in demo["final_losses"].items()) + ".", ""]
    if full:
        lines.append(f"Whole two-stage `paper` preset ({full['epochs']} epochs per stage) on {full['n']} random "
                     f"32x32x3 images on {full['gpu']}: {full['seconds']:.0f} s ({full['seconds'] / 60:.1f} min).")
    else:
        lines.append("Whole two-stage `paper` run on 50,000 x 32x32x3: skipped (no CUDA in this run).")
    write_text_atomic(Path(args.out), "\n".join(lines) + "\n")
    write_json(Path(args.out).with_suffix(".json"), manifest("purify_speed", vars(args), 0, {}, rows=rows, full=full,
                                                            quality=qual, demo=demo))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
