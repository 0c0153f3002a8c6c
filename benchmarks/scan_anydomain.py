"""The scan's verdict on domains it was never calibrated on (issue 24, item 2): clean subsets of several
domains and sizes, and every attack at 10 / 50 / 100 % poisoning, written as one JSON line per cell.

Domains (built here, no download): ``fmnist`` (28x28 grey), ``fmnist-rgb32`` (Fashion-MNIST padded to
32x32 and tinted with a random hue per image, independent of the class), ``digits-rgb32`` (scikit-learn's
8x8 digits, bilinearly upsampled to 32x32 and tinted the same way; ``--digits`` names sklearn's
``digits.csv.gz``) and ``npz:PATH`` (any ``x_train``/``y_train`` npz, e.g. the RGB icon set).
Poisoned sets are cached under ``--cache`` (keyed by domain, size, seed, attack, preset, ratio).

    python benchmarks/scan_anydomain.py OUT.jsonl --domains fmnist,fmnist-rgb32 --sizes 1000,5000 \
        --seeds 0,1 --attacks lsp,ops,ar --ratios 0.1,0.5,1.0 --n-attack 2000
    python benchmarks/scan_anydomain.py OUT.jsonl --table > verdicts.md     # the markdown tables
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from pathlib import Path

import numpy as np


def _tint(x: np.ndarray, seed: int) -> np.ndarray:
    """Grey uint8 N x H x W -> N x H x W x 3: each image multiplied by a random saturated colour (its own)."""
    import colorsys

    rng = np.random.default_rng(seed)
    cols = np.array([colorsys.hsv_to_rgb(h, s, 1.0) for h, s in zip(rng.random(len(x)),
                                                                   rng.uniform(0.3, 1.0, len(x)))])
    base = rng.uniform(0, 60, (len(x), 1, 1, 3))  # a dim background colour per image
    g = x.astype(np.float32)[..., None] / 255.0
    out = base * (1 - g) + 255.0 * g * cols[:, None, None, :]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def load_domain(name: str, digits: str | None = None, test: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The whole training split of a domain (``test``: its test split) as uint8 NHWC and int labels."""
    if name in ("fmnist", "fmnist-rgb32"):
        from unpoison.data import load_dataset

        ds = load_dataset("fmnist")
        x, y = (ds.x_test, ds.y_test) if test else (ds.x_train, ds.y_train)
        if name == "fmnist":
            return x, y
        g = np.pad(x[..., 0], ((0, 0), (2, 2), (2, 2)))
        return _tint(g, 11 if test else 1), y
    if name == "digits-rgb32":
        import torch
        import torch.nn.functional as F

        if not digits or not Path(digits).is_file():
            raise SystemExit("digits-rgb32 needs --digits PATH/TO/digits.csv.gz (scikit-learn's)")
        with gzip.open(digits, "rt") as fh:
            a = np.loadtxt(fh, delimiter=",")
        g = torch.from_numpy(a[:, :64].reshape(-1, 1, 8, 8) / 16.0).float()
        g = F.interpolate(g, size=32, mode="bilinear", align_corners=False)[:, 0].numpy()
        return _tint(np.clip(np.rint(g * 255), 0, 255).astype(np.uint8), 2), a[:, 64].astype(np.int64)
    if test and not name.startswith("npz:"):
        raise SystemExit(f"{name} has no test split to take a clean reference from")
    if name.startswith("npz:"):
        with np.load(name[4:], allow_pickle=False) as z:
            x, y = (z["x_test"], z["y_test"]) if test else (z["x_train"], z["y_train"])
        return (x if x.ndim == 4 else x[..., None]), y.astype(np.int64)
    raise SystemExit(f"unknown domain {name!r}")


def subset(x: np.ndarray, y: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A class-stratified random subset of ``n`` images (all when ``n`` >= the set)."""
    if n >= len(y):
        return x, y
    rng = np.random.default_rng(seed)
    idx = np.concatenate([rng.choice(np.flatnonzero(y == c), int(round(n * np.mean(y == c))), replace=False)
                          for c in np.unique(y)])
    idx = np.sort(idx[:n])
    return np.ascontiguousarray(x[idx]), y[idx]


def poisoned(x: np.ndarray, y: np.ndarray, attack: str, ratio: float, seed: int, preset: str,
             cache: Path, key: str) -> tuple[np.ndarray, np.ndarray]:
    """The set poisoned by ``attack`` at ``ratio`` (cached), and the poisoned indices."""
    from unpoison.attacks import make_attack

    f = cache / f"{key}-{attack}-{preset}-r{ratio:g}-s{seed}.npz"
    if f.is_file():
        with np.load(f) as z:
            return z["x"], z["idx"]
    t0 = time.time()
    res = make_attack(attack, seed=seed, device="cpu", progress=False, preset=preset).poison(x, y, ratio)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = f.with_suffix(".tmp.npz")
    np.savez(tmp, x=res.x, idx=res.indices)
    tmp.rename(f)
    print(f"# crafted {f.name} in {time.time() - t0:.0f}s", flush=True)
    return res.x, res.indices


def _dom(d: str) -> str:
    return Path(d[4:]).stem if d.startswith("npz:") else d


def _tests(r: dict) -> dict[str, float]:
    """Every test of the final rule (self: linear, pattern; the null where used), in units of its threshold."""
    from unpoison.scan import DEFAULT_SELF_THRESHOLD, DEFAULT_THRESHOLD, SELF_TESTED

    e = r["evidence"]
    out = {f"self:{s}": v["self_z"] / DEFAULT_SELF_THRESHOLD for s, v in e.items() if s in SELF_TESTED}
    out.update({f"clean:{s}": v["clean_z"] / DEFAULT_SELF_THRESHOLD for s, v in e.items() if "clean_z" in v})
    if r.get("verdict_info", {}).get("null_used"):
        out.update({f"null:{s}": abs(v["null_z"]) / DEFAULT_THRESHOLD for s, v in e.items() if "null_z" in v})
    return out


def final_verdict(r: dict) -> bool:
    return any(v >= 1 for v in _tests(r).values())


def final_score(r: dict) -> float:
    return max(_tests(r).values(), default=0.0)


def table(rows: list[dict]) -> str:
    """Clean cells, then poisoned ones: verdict, score (>= 1: poisoned), each signal's effect against its content
    reference (z beyond the margin), the Fashion-MNIST null's z where it applies, per-sample P/R/F1."""
    sig = ["nb", "linear", "pattern"]
    head = ("| domain | geometry | attack | ratio | n | seed | verdict | score | "
            + " | ".join(f"{s}: data / ref, effect (z)" for s in sig) + " | null z (used?) | fired | P / R / F1 | s |")
    if any(r.get("clean_ref") for r in rows):
        head = head.replace(" | null z", " | clean ref (n): z nb / linear / pattern | null z")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    key = {"fmnist": 0, "fmnist-rgb32": 1, "digits-rgb32": 2}
    rows = sorted(rows, key=lambda r: (r["attack"] != "none", key.get(r["domain"], 3), r["attack"],
                                       r["ratio"] or 0, r["n"], r["seed"]))
    for r in rows:
        e = r["evidence"]
        final = final_verdict(r)
        if final != r["poisoned"]:  # run before nb left the self test: the same statistics, the final rule
            r = {**r, "poisoned": final, "score": final_score(r), "rederived": True}
            r.pop("f1", None) if not final else None
        cells = []
        for s in sig:
            v = e.get(s, {})
            eff = f"{v['self_effect']:+.2f}" if s == "pattern" else f"{v['self_effect']:+.1f}"
            cells.append(f"{v['stat']:.3g} / {v['self_ref']:.3g}, {eff} ({v['self_z']:+.1f})")
        nz = [f"{s} {e[s]['null_z']:+.1f}" for s in sig if "null_z" in e.get(s, {})]
        if "clean ref" in head:
            cells.append(f"({r.get('clean_ref')}) " + " / ".join(f"{e[s]['clean_z']:+.1f}" for s in sig)
                         if r.get("clean_ref") else "-")
        used = r.get("verdict_info", {}).get("null_used")
        fired = ", ".join(t for t, v in sorted(_tests(r).items()) if v >= 1) or "-"
        prf = (f"{r['precision']:.3f} / {r['recall']:.3f} / {r['f1']:.3f}" if "f1" in r and r["poisoned"] else
               ("nothing flagged" if "f1" in r else ""))
        verdict = ("**POISONED**" if r["poisoned"] else "clean") + (" *" if r.get("rederived") else "")
        out.append(f"| {_dom(r['domain'])} | {r['geometry']} | {r['attack']} | {r['ratio'] if r['ratio'] else '-'} | "
                   f"{r['n']} | {r['seed']} | {verdict} | {r['score']:.2f} | " + " | ".join(cells)
                   + f" | {', '.join(nz) if nz else '-'}{' (used)' if used else (' (not used)' if nz else '')} | "
                   f"{fired} | {prf} | {r['seconds']:.0f} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--domains", default="fmnist,fmnist-rgb32,digits-rgb32")
    ap.add_argument("--digits", default=None)
    ap.add_argument("--sizes", default="1000,2000,5000")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--attacks", default="lsp,ops,ar")
    ap.add_argument("--ratios", default="0.1,0.5,1.0")
    ap.add_argument("--n-attack", type=int, default=2000)
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--cache", default="runs/scan-anydomain/cache")
    ap.add_argument("--craft-only", action="store_true")
    ap.add_argument("--no-clean", action="store_true")
    ap.add_argument("--clean-ref", type=int, default=0,
                    help="also test against this many clean images of the domain's test split (--clean-reference)")
    ap.add_argument("--table", action="store_true", help="print OUT.jsonl's rows as markdown tables and stop")
    a = ap.parse_args()
    if a.table:
        print(table([json.loads(line) for line in Path(a.out).read_text().splitlines() if line.strip()]))
        return
    from unpoison.scan import scan

    cache = Path(a.cache)
    out = Path(a.out)
    done = set()
    if out.is_file():
        done = {json.loads(line)["cell"] for line in out.read_text().splitlines() if line.strip()}
    for dom in a.domains.split(","):
        xa, ya = load_domain(dom, a.digits)
        ref = subset(*load_domain(dom, a.digits, test=True), a.clean_ref, 99) if a.clean_ref else None
        cells = [] if a.no_clean else [("none", 1.0, int(n), int(s)) for n in a.sizes.split(",")
                                          for s in a.seeds.split(",")]
        cells += [(at, float(r), a.n_attack, 0) for at in a.attacks.split(",") if at for r in a.ratios.split(",")]
        for attack, ratio, n, seed in cells:
            cell = f"{dom}|{attack}|{ratio:g}|{n}|{seed}"
            cell += f"|ref{a.clean_ref}" if ref else ""
            if cell in done:
                continue
            x, y = subset(xa, ya, n, seed)
            idx = np.zeros(0, dtype=np.int64)
            key = f"{dom.replace('/', '_').replace(':', '_')}-n{len(y)}-s{seed}"
            if attack != "none":
                x, idx = poisoned(x, y, attack, ratio, seed, a.preset, cache, key)
            if a.craft_only:
                continue
            t0 = time.time()
            r = scan(x, y, seed=seed, progress=False, clean_reference=ref)
            row = {"cell": cell, "clean_ref": len(ref[1]) if ref else 0, "domain": dom, "attack": attack,
                   "ratio": ratio if attack != "none" else None,
                   "n": len(y), "seed": seed, "geometry": r.info["geometry"], "poisoned": r.poisoned,
                   "score": round(r.score, 3), "kind": r.kind, "seconds": round(time.time() - t0, 1),
                   "evidence": r.evidence, "verdict_info": r.info.get("verdict", {})}
            if len(idx):
                t = np.zeros(len(y), bool)
                t[idx] = True
                tp = int((r.flags & t).sum())
                prec = tp / max(int(r.flags.sum()), 1)
                rec = tp / len(idx)
                row.update(precision=prec, recall=rec, f1=2 * prec * rec / max(prec + rec, 1e-12))
            print(json.dumps(row, default=float), flush=True)
            with out.open("a") as fh:
                fh.write(json.dumps(row, default=float) + "\n")


if __name__ == "__main__":
    main()
