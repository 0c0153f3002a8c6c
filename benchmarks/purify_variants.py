"""Purifier variants on clean and poisoned copies of a dataset: what each stage did to the images (PSNR against
the clean images, the subtraction gate's probe numbers) and the ``cpu`` scoring protocol's accuracy (issue 24).

A job list (JSON: a list of objects) names the rows; each row crafts its poison (the attack's ``cpu`` preset,
seed 0) on the whole training set of ``data`` (optionally a stratified subset), purifies it with ``method`` and
``params`` (purifier seed 0) and scores the result with each judge seed. Rows run in ``--workers`` processes with
one torch thread each and are appended to OUT.jsonl as they finish (a rerun skips finished rows);
``--table`` prints the Markdown table of OUT.jsonl.

``data`` is any dataset spec, or ``fmnist-rgb32`` (``benchmarks/scan_anydomain.py``'s built domain: Fashion-MNIST
padded to 32x32 and tinted per image; its test split tinted with another seed).

Example (the committed run, docs/results/rgb-geometry.md)::

    OMP_NUM_THREADS=1 python benchmarks/purify_variants.py docs/results/rgb-geometry/jobs.json \\
        docs/results/rgb-geometry/rows.jsonl --workers 2
    python benchmarks/purify_variants.py docs/results/rgb-geometry/jobs.json docs/results/rgb-geometry/rows.jsonl \\
        --table
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _dataset(spec: str, n_train: int) -> Any:
    from unpoison.data import load_dataset

    if spec == "fmnist-rgb32":
        sys.path.insert(0, str(HERE))
        from scan_anydomain import load_domain

        x, y = load_domain(spec)
        xt, yt = load_domain(spec, test=True)
        ds = load_dataset("fmnist").replace(x_train=x, y_train=y, x_test=xt, y_test=yt, source=spec)
    else:
        ds = load_dataset(spec)
    return ds.subset(n_train=n_train, seed=0) if n_train else ds


def run_row(row: dict[str, Any]) -> dict[str, Any]:
    """One row, in a fresh process with one torch thread."""
    import torch

    torch.set_num_threads(1)
    from unpoison.attacks.base import make_attack
    from unpoison.defenses.base import make_purifier
    from unpoison.train import TrainConfig, train_classifier
    from unpoison.utils import psnr

    out: dict[str, Any] = {k: row.get(k) for k in ("name", "data", "n_train", "attack", "method", "params")}
    try:
        ds = _dataset(row["data"], int(row.get("n_train") or 0))
        clean = ds.x_train
        attack = row.get("attack", "none")
        t = time.process_time()
        x0 = clean if attack == "none" else make_attack(attack, seed=0, device="cpu", progress=False,
                                                        preset="cpu").poison(clean, ds.y_train).x
        out.update(n=len(clean), craft_cpu_s=round(time.process_time() - t, 1), psnr_x0=float(psnr(clean, x0)))
        t = time.process_time()
        method = row.get("method", "none")
        if method == "none":
            x3 = x0
        else:
            p = make_purifier(method, device="cpu", seed=0, progress=False, **row.get("params", {}))
            x3 = p.fit_purify(x0, ds.y_train)
            info = getattr(p, "info_", {}) or {}
            gate = info.get("subtract_gate") or {}
            out["gate"] = {k: [v.get("probe_before"), v.get("probe_after"), v.get("kept")]
                           for k, v in gate.items() if isinstance(v, dict)}
            out["refit"] = (info.get("p_refit") or {}).get("applied")
            out["widths"], out["kld_limits"] = info.get("widths"), info.get("kld_limits")
            if "after stage 1" in getattr(p, "stages_", {}):
                out["psnr_x1"] = float(psnr(clean, p.stages_["after stage 1"]))
        out["purify_cpu_s"] = round(time.process_time() - t, 1)
        out["psnr_x3"] = float(psnr(clean, x3))
        for s in row.get("seeds", [0]):
            t = time.process_time()
            r = train_classifier(ds.replace(x_train=x3), None, TrainConfig.preset("cpu"), seed=int(s), device="cpu",
                                 progress=False)
            out[f"acc{s}"] = round(r.final_acc, 2)
            out[f"judge_cpu_s{s}"] = round(time.process_time() - t, 1)
    except Exception as e:  # noqa: BLE001 - a failed row is recorded and the others go on
        out["error"] = repr(e)[:300]
    out["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    return out


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one line per row, in the job list's order."""
    def f(v: Any, nd: int = 2) -> str:
        return "-" if v is None else ("inf" if v == float("inf") else f"{v:.{nd}f}")

    lines = ["| row | data | attack | method / params | gate: probe before -> after (kept) | refit | PSNR to clean: "
             "x0 / x1 / x3 (dB) | accuracy (judge seeds) | purify CPU s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | {r.get('data')} | {r.get('attack')} | error: {r['error']} |||||| ")
            continue
        gate = "; ".join(f"{k} {b} -> {a} ({'kept' if kept else 'refused'})" for k, (b, a, kept) in
                         (r.get("gate") or {}).items()) or "-"
        accs = " / ".join(f"{v:.2f}" for k, v in sorted(r.items()) if k.startswith("acc"))
        params = json.dumps(r.get("params") or {}, separators=(",", ":")) if r.get("method") != "none" else ""
        lines.append(f"| {r['name']} | {r['data']} ({r.get('n')}) | {r['attack']} | {r['method']} {params} | {gate} | "
                     f"{r.get('refit') or '-'} | {f(r.get('psnr_x0'))} / {f(r.get('psnr_x1'))} / {f(r.get('psnr_x3'))}"
                     f" | {accs} | {f(r.get('purify_cpu_s'), 0)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("jobs", help="JSON list of rows: name, data, n_train, attack, method, params, seeds")
    ap.add_argument("out", help="JSONL of finished rows (appended; finished rows are skipped)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--table", action="store_true", help="print OUT's Markdown table and exit")
    a = ap.parse_args()
    jobs = json.loads(Path(a.jobs).read_text())
    done: dict[str, dict[str, Any]] = {}
    if Path(a.out).exists():
        for line in Path(a.out).read_text().splitlines():
            r = json.loads(line)
            if "error" not in r:
                done[r["name"]] = r
    if a.table:
        print(table([done[j["name"]] for j in jobs if j["name"] in done]))
        return
    todo = [j for j in jobs if j["name"] not in done]
    os.environ["OMP_NUM_THREADS"] = "1"
    with mp.get_context("spawn").Pool(a.workers, maxtasksperchild=1) as pool:
        for r in pool.imap_unordered(run_row, todo, chunksize=1):
            with open(a.out, "a") as fh:
                fh.write(json.dumps(r) + "\n")
            print(json.dumps({k: r.get(k) for k in ("name", "psnr_x3", "acc0", "error")}), flush=True)


if __name__ == "__main__":
    main()
