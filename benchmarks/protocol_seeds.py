"""Seed spread of the scoring protocol: N seeds x protocol variants on one training set (issue 27).

Every claim this product makes is a difference between two scores, so the protocol's own seed noise
decides which differences mean anything. This trains the judge classifier with each ``--variant``
(a preset plus field overrides, JSON) for each seed on the same data, in ``--workers`` processes with
one torch thread each, and prints per variant: mean, std (n-1), min/max of the last-epoch clean test
accuracy, and CPU seconds per score (``time.process_time`` of the worker).

Example (the committed run, docs/results/protocol_seeds.md)::

    OMP_NUM_THREADS=1 python benchmarks/protocol_seeds.py --data fmnist --n-train 10000 --seeds 0,1,2,3,4 \\
        --variant 'old={"preset": "cpu", "ema": 0, "tta_flip": false, "label_smoothing": 0}' \\
        --variant 'new={"preset": "cpu"}'
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"


def _one(job: tuple[str, str, int, int, dict, int]) -> dict:
    """Train one judge (in a worker process, one thread) and return its score and CPU time."""
    name, data, n_train, data_seed, variant, seed = job
    import torch

    torch.set_num_threads(1)
    from unpoison.data import load_dataset
    from unpoison.train import TrainConfig, train_classifier

    ds = load_dataset(data).subset(n_train=n_train, seed=data_seed)
    over = dict(variant)
    cfg = TrainConfig.preset(str(over.pop("preset", "cpu")), **over)
    c0, w0 = time.process_time(), time.perf_counter()
    res = train_classifier(ds, None, cfg, seed=seed, device="cpu", progress=False)
    return {"variant": name, "seed": seed, "final_acc": res.final_acc, "best_acc": res.best_acc,
            "cpu_s": time.process_time() - c0, "wall_s": time.perf_counter() - w0, "config": res.config}


def cpu_flags() -> str:
    """The CPU model and its vector/matrix extensions (speeds compare only between CPUs with the same ones)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), [])
    keep = [f for f in flags if f.startswith(("avx", "amx")) or f in ("fma", "f16c")]
    return f"{model}; {' '.join(keep)}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="fmnist")
    ap.add_argument("--n-train", type=int, default=10000)
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--variant", action="append", required=True, help='NAME={"preset": "cpu", "ema": 0.99, ...}')
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default=None, help="Markdown file to write (and .json beside it)")
    a = ap.parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",")]
    variants = {}
    for v in a.variant:
        name, _, js = v.partition("=")
        variants[name] = json.loads(js)
    jobs = [(n, a.data, a.n_train, a.data_seed, v, s) for n, v in variants.items() for s in seeds]
    t0 = time.perf_counter()
    ctx = mp.get_context("spawn")
    os.environ["OMP_NUM_THREADS"] = "1"
    with ctx.Pool(a.workers) as pool:
        rows = []
        for r in pool.imap_unordered(_one, jobs):
            rows.append(r)
            print(f"{r['variant']:>12} seed {r['seed']}: {r['final_acc']:.2f} ({r['cpu_s']:.0f} CPU s)", flush=True)
    lines = ["| variant | n seeds | mean | std | min | max | CPU s / score | per seed |",
             "|---|---|---|---|---|---|---|---|"]
    summary = {}
    for n in variants:
        rs = sorted((r for r in rows if r["variant"] == n), key=lambda r: r["seed"])
        accs = [r["final_acc"] for r in rs]
        sd = statistics.stdev(accs) if len(accs) > 1 else float("nan")
        cpu = statistics.mean(r["cpu_s"] for r in rs)
        summary[n] = {"mean": statistics.mean(accs), "std": sd, "n": len(accs), "cpu_s": cpu, "accs": accs,
                      "config": rs[0]["config"]}
        lines.append(f"| {n} | {len(accs)} | {statistics.mean(accs):.2f} | {sd:.2f} | {min(accs):.2f} "
                     f"| {max(accs):.2f} | {cpu:.0f} | {' / '.join(f'{x:.2f}' for x in accs)} |")
    table = "\n".join(lines)
    print(table)
    if a.out:
        import torch

        args = " ".join(shlex.quote(x) for x in (argv or sys.argv[1:]))
        cmd = f"OMP_NUM_THREADS=1 python benchmarks/protocol_seeds.py {args}"
        head = (f"# Scoring protocol: seed spread\n\nCommand: `{cmd}`\n\nDevice: CPU ({cpu_flags()}), "
                f"{a.workers} workers x 1 torch thread; torch {torch.__version__}; {time.strftime('%Y-%m-%d')}; "
                f"wall {time.perf_counter() - t0:.0f} s. "
                f"Data: `{a.data}`, {a.n_train} training images (subset seed {a.data_seed}), full test split; "
                f"score = clean test accuracy (%) at the last epoch.\n\n")
        variants_md = "\n".join(f"- `{n}`: `{json.dumps(v)}`" for n, v in variants.items())
        Path(a.out).write_text(head + table + "\n\nVariants (preset + overrides):\n\n" + variants_md + "\n")
        Path(a.out).with_suffix(".json").write_text(json.dumps({"rows": rows, "summary": summary, "command": cmd},
                                                               indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
