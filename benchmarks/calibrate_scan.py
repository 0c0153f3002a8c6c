"""Measure the scan's clean-data null: its three statistics on clean subsets of several sizes and seeds,
the mean per size and the spread pooled over sizes, written to ``src/unpoison/scan_null.json``.

The seeds here (10..14) are disjoint from the clean subsets the ``scan`` bench config evaluates
(seeds 0..3), so the bench's clean verdicts are out-of-sample.

    python benchmarks/calibrate_scan.py [--data fmnist] [--sizes 1000,2000,5000,10000] [--seeds 10,11,12,13,14]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from unpoison.data import load_dataset
from unpoison.outputs import atomic_path
from unpoison.scan import NULL_FILE, ScanConfig, _geometry, fit_null, load_null, measure


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="fmnist")
    ap.add_argument("--sizes", default="1000,2000,5000,10000")
    ap.add_argument("--seeds", default="10,11,12,13,14")
    ap.add_argument("--out", default=str(NULL_FILE))
    a = ap.parse_args()
    full = load_dataset(a.data)
    rows = []
    t_all = time.time()
    for n in [int(v) for v in a.sizes.split(",")]:
        for seed in [int(v) for v in a.seeds.split(",")]:
            ds = full.subset(n, None, seed)
            t0 = time.time()
            stats, _, times = measure(ds.x_train, ds.y_train, ScanConfig(), seed=seed, progress=False)
            rows.append({"n": n, "seed": seed, **stats, "time_s": time.time() - t0})
            print(json.dumps(rows[-1]), flush=True)
    geometry = _geometry(full.x_train.shape)
    null = load_null(a.out)
    null[geometry] = fit_null(rows)
    null.setdefault("_meta", {})[geometry] = {"data": a.data, "rows": rows, "config": vars(ScanConfig()),
                                              "minutes": (time.time() - t_all) / 60}
    with atomic_path(a.out) as tmp:
        tmp.write_text(json.dumps(null, indent=1, default=str) + "\n")
    for s, t in null[geometry].items():
        means = {n: round(m, 3) for n, m in zip(t["n"], t["mean"])}
        print(f"{s}: means {means}, sd {t['sd']:.3f} (measured {t['sd_measured']:.3f})")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
