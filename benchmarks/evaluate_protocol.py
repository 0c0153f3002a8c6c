"""Scoring-protocol benchmark: clean accuracy of the CPU preset, model throughput, ResNet-18 on CUDA.

Prints a Markdown table and writes it to ``--out`` (default ``docs/results/evaluate.md``) with a
header naming the command, device, date and torch version, plus ``<out>.json`` (the manifest).

1. Fashion-MNIST training split (``--n-train``, default all 60k), ``cpu`` preset (smallcnn, 15
   epochs): clean test accuracy at the last epoch (target >= 91%).
2. Training throughput (images/s, forward + backward + SGD step) of every registered model on CPU,
   at 28x28x1 and 32x32x3, batch 128, ``--steps`` timed steps after one warm-up step.
3. ResNet-18, 20 epochs, same data: only on CUDA ("skipped: no GPU" otherwise).

Full run: ``python benchmarks/evaluate_protocol.py``; smoke check:
``python benchmarks/evaluate_protocol.py --n-train 2000 --epochs 1 --steps 2 --out /tmp/ev.md``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from unpoison.data import load_dataset
from unpoison.models import MODELS, create_model
from unpoison.scoring import evaluate
from unpoison.tensors import pick_device
from unpoison.train import TrainConfig
from unpoison.utils import Timer, manifest, write_json, write_text_atomic


def throughput(name: str, shape: tuple[int, int, int], steps: int, batch: int = 128) -> float:
    """Train images/s of ``name`` on CPU for ``steps`` SGD steps on random data (after one warm-up)."""
    c, h, _ = shape
    torch.manual_seed(0)
    model = create_model(name, 10, c, h).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.rand(batch, c, h, h).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    model.train()

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - t0)


def MODELS_CHECK(name: str) -> str:  # noqa: N802
    """A registered model name (UserError otherwise)."""
    MODELS.get(name)
    return name.lower()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="fmnist", help="dataset spec (default fmnist)")
    p.add_argument("--n-train", type=int, default=None, help="stratified training subset (default: all)")
    p.add_argument("--epochs", type=int, default=15, help="epochs of part 1 (cpu preset: 15)")
    p.add_argument("--resnet-epochs", type=int, default=20, help="epochs of part 3 (CUDA only)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per model in part 2")
    p.add_argument("--models", default=None, help="comma list for part 2 (default: every registered model)")
    p.add_argument("--device", default="auto", help="device of parts 1 and 3 (part 2 is always CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="docs/results/evaluate.md")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    command = "python benchmarks/evaluate_protocol.py " + " ".join(map(shlex.quote, sys.argv[1:] if argv is None
                                                                       else argv))
    dev = pick_device(args.device)
    timer = Timer()
    ds = load_dataset(args.data)
    if args.n_train:
        ds = ds.subset(args.n_train, None, seed=args.seed)
    lines: list[str] = []
    results: dict[str, object] = {}

    # 1. clean accuracy of the CPU preset
    cfg = TrainConfig.preset("cpu", epochs=args.epochs)
    with timer("part1_cpu_preset"):
        rec = evaluate(ds, config=cfg, seed=args.seed, device=dev, progress=not args.quiet, desc="smallcnn")
    results["cpu_preset"] = rec
    lines += ["## 1. Clean test accuracy, cpu preset", "",
              "| data | n_train | n_test | model | epochs | device | final acc % | best acc % (epoch) | "
              "train time s | img/s |",
              "|---|---|---|---|---|---|---|---|---|---|",
              f"| {args.data} | {rec['n_train']} | {rec['n_test']} | {cfg.model} | {cfg.epochs} | {dev} | "
              f"{rec['final_acc']:.2f} | {rec['best_acc']:.2f} ({rec['best_epoch']}) | {rec['train_time_s']:.1f} | "
              f"{rec['images_per_s']:.0f} |", "",
              "Target (full 60k, 15 epochs): >= 91%.", ""]

    # 2. throughput of every registered model on CPU
    shapes = {"28x28x1": (1, 28, 28), "32x32x3": (3, 32, 32)}
    thr: dict[str, dict[str, float]] = {}
    with timer("part2_throughput"):
        names = [MODELS_CHECK(n) for n in args.models.split(",")] if args.models else MODELS.names()
        for name in (bar := tqdm(names, desc="throughput", disable=args.quiet)):
            bar.set_postfix(model=name)
            thr[name] = {k: throughput(name, s, args.steps) for k, s in shapes.items()}
    results["throughput_cpu_img_per_s"] = thr
    lines += [f"## 2. Training throughput on CPU (batch 128, {args.steps} timed steps, "
              f"{torch.get_num_threads()} threads)", "",
              "| model | 28x28x1 img/s | 32x32x3 img/s |", "|---|---|---|"]
    lines += [f"| {n} | {v['28x28x1']:.0f} | {v['32x32x3']:.0f} |" for n, v in thr.items()]
    lines.append("")

    # 3. ResNet-18, CUDA only
    lines += [f"## 3. ResNet-18, {args.resnet_epochs} epochs", ""]
    if dev.type != "cuda":
        lines.append("skipped: no GPU")
        results["resnet18"] = "skipped: no GPU"
    else:
        rcfg = TrainConfig.preset("paper", epochs=args.resnet_epochs)
        with timer("part3_resnet18"):
            r = evaluate(ds, config=rcfg, seed=args.seed, device=dev, progress=not args.quiet, desc="resnet18")
        results["resnet18"] = r
        lines += ["| data | n_train | epochs | device | final acc % | best acc % (epoch) | train time s | img/s |",
                  "|---|---|---|---|---|---|---|---|",
                  f"| {args.data} | {r['n_train']} | {rcfg.epochs} | {torch.cuda.get_device_name(dev)} | "
                  f"{r['final_acc']:.2f} | {r['best_acc']:.2f} ({r['best_epoch']}) | {r['train_time_s']:.1f} | "
                  f"{r['images_per_s']:.0f} |"]
    lines.append("")

    body = "\n".join(lines)
    print(body)
    devname = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    header = ["# Scoring protocol benchmark", "",
              f"- command: `{command}`", f"- device: {devname}", f"- date: {time.strftime('%Y-%m-%d %H:%M:%S %z')}",
              f"- torch: {torch.__version__}", f"- seed: {args.seed}", ""]
    out = Path(args.out)
    write_text_atomic(out, "\n".join(header) + "\n" + body + "\n")
    write_json(out.with_suffix(".json"), manifest("benchmarks/evaluate_protocol.py", vars(args), args.seed,
                                                  timer.times, results=results, device=str(dev)))
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
