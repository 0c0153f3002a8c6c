"""The kind-specific tables: the ablation grid (Tables 5-6 shape), the quality-vs-compute frontier, attack
efficacy, the per-stage measurements against the clean images and the disentangle check (Table 1 beside stage 1's
numbers). Every number goes through :func:`unpoison.bench.table.num` / :func:`~unpoison.bench.table.mean_text`."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import numpy as np

from .table import Table, axis_label, dig, finite, mean_text, num, status_text


def purify_cpu_s(r: dict[str, Any]) -> float | None:
    """A cell's purification CPU seconds (fit + transform; every thread of the process), else its wall seconds;
    None for a cell that ran more than once (a resumed purifier times only its last part)."""
    if int(r.get("attempts") or 0) > 1:
        return None
    t = r.get("timings") or {}
    v = t.get("purify_cpu", t.get("purify"))
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def frontier_table(cells: list[dict[str, Any]], title: str) -> Table:
    """Per defense: its purification CPU time (mean over the attacks), the accuracy on each attack, and the
    two numbers the targets are stated in: the largest gap to the clean set (w/o) over the effective poisons
    (w/o >= 10 points below clean) and the cost on the clean set."""
    defs: list[str] = []
    atks: list[str] = []
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    clean_atk = none_def = None
    for r in cells:
        a, d = axis_label(r["config"], "attack"), axis_label(r["config"], "defense")
        defs += [d] if d not in defs else []
        atks += [a] if a not in atks else []
        groups[(d, a)].append(r)
        clean_atk = a if r["config"]["attack"]["name"] == "none" else clean_atk
        none_def = d if r["config"]["defense"]["name"] == "none" else none_def

    def accs(d: str, a: str) -> list[float]:
        return finite([(r["results"] or {}).get("final_acc") for r in groups.get((d, a), []) if r["status"] == "done"])

    def acc(d: str, a: str) -> float | None:
        v = accs(d, a)
        return float(np.mean(v)) if v else None

    def seeds(d: str) -> str:
        n = sorted({len({int(r["config"].get("seed", 0)) for r in groups.get((d, a), []) if r["status"] == "done"})
                    for a in atks} - {0})
        return "-" if not n else str(n[0]) if len(n) == 1 else f"{n[0]}-{n[-1]}"

    base = acc(none_def, clean_atk) if none_def and clean_atk else None
    effective = [a for a in atks if a != clean_atk and base is not None and none_def is not None
                 and (v := acc(none_def, a)) is not None and base - v >= 10]
    body = []
    for d in defs:
        cpu = finite([purify_cpu_s(r) for a in atks for r in groups.get((d, a), []) if r["status"] == "done"])
        gaps = [base - v for a in effective if base is not None and (v := acc(d, a)) is not None]
        clean = acc(d, clean_atk) if clean_atk else None
        body.append([d, num(np.mean(cpu) / 60) if cpu and d != none_def else "-", seeds(d),
                     *[mean_text(accs(d, a)) or "-" for a in atks],
                     num(max(gaps)) if gaps and len(gaps) == len(effective) else "-",
                     num(base - clean) if base is not None and clean is not None else "-"])
    header = ["defense", "purify CPU min (mean)", "seeds", *atks, "worst gap to clean (effective)",
              "clean-set cost"]
    note = ("CPU time: fit + transform of the purifier, all its threads, mean over the attacks it ran on in one go "
            "(a resumed cell times only its last part and is left out; wall time moves with the machine's load). "
            "Accuracies: mean ± std over the seeds (the number of seeds per attack, or its range); gaps and costs "
            "from the means. "
            "effective poisons: " + (", ".join(effective) or "none")
            + (f"; clean (w/o) {num(base)}" if base is not None else "") + ".")
    return Table(title, header, body, note)


def _bound_text(info: dict[str, Any]) -> str:
    norm, eps = info.get("norm"), info.get("eps")
    if eps is None:
        return "-"
    if norm == "linf":
        return f"l_inf {num(eps * 255, '.0f')}/255"
    return f"l2 {num(eps, '.3f')}" if norm == "l2" else f"l0 {num(eps, '.0f')} px"


def efficacy_table(cells: list[dict[str, Any]], title: str) -> Table:
    """Attack efficacy, one row per attack (and defense, when a grid has several): the bound enforced, PSNR of
    the poisoned set to the clean one, the surrogate's accuracy on its own poison, clean test accuracy, its drop
    from the clean row (attack ``none``), accuracy without crop/flip (when measured) and the time to craft."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in cells:
        groups[(axis_label(r["config"], "attack"), axis_label(r["config"], "defense"))].append(r)
    several = len({d for _, d in groups}) > 1
    no_aug = any((r["results"] or {}).get("acc_no_aug") is not None for r in cells)

    def mean(g: list[dict[str, Any]], key: str) -> float | None:
        v = [float(r["results"][key]) for r in g if r["status"] == "done" and r["results"].get(key) is not None]
        return float(np.mean(v)) if v else None

    clean = {d: mean(g, "final_acc") for (a, d), g in groups.items() if g[0]["config"]["attack"]["name"] == "none"}
    body = []
    for (atk, dfn), g in groups.items():
        done = [r for r in g if r["status"] == "done"]
        info = (done[0]["results"].get("attack_info") or {}) if done else {}
        acc = mean(g, "final_acc")
        sur = next((info[k] for k in ("surrogate_acc_poisoned", "surrogate_acc") if info.get(k) is not None), None)
        sur_txt = num(sur, ".1f", "-")
        if info.get("target_hit_rate") is not None:
            sur_txt += f" (target hit {num(info['target_hit_rate'], '.1f')})"
        base = clean.get(dfn)
        is_clean = g[0]["config"]["attack"]["name"] == "none"
        psnr_a, craft, plain = mean(g, "psnr_attack"), mean(g, "craft_s"), mean(g, "acc_no_aug")
        line = [atk] + ([dfn] if several else []) + [
            _bound_text(info), "-" if is_clean else num(psnr_a, missing="-"), sur_txt,
            num(acc) if acc is not None else (status_text(g) or ""),
            "-" if is_clean or acc is None or base is None else num(base - acc, ".1f")]
        if no_aug:
            line.append(num(plain))
        line.append("-" if is_clean else num(craft, ".0f", "-"))
        body.append(line)
    header = ["attack"] + (["defense"] if several else []) + [
        "bound", "PSNR (dB)", "surrogate acc on poison (%)", "test acc (%)", "drop (pts)"]
    header += (["test acc, no crop/flip (%)"] if no_aug else []) + ["craft (s)"]
    return Table(title, header, body)


def _m(vals: list[Any], digits: int = 3, pct: bool = False) -> str:
    """A measurement's mean over seeds (non-finite values left out; "-" for none)."""
    return mean_text(vals, digits, pct, finite_only=True, count=True)


def _measure_axes(cells: list[dict[str, Any]]) -> list[str]:
    axes = ["attack", "defense"]
    if len({str(r["config"].get("ratio")) for r in cells}) > 1:
        axes.append("ratio")
    return axes


def measurement_tables(cells: list[dict[str, Any]], where: str) -> list[tuple[str, Table]]:
    """Stage 1's ``p_hat`` against the true perturbation, and every stage against the clean images, one row per
    (attack, defense[, ratio]) and block (all images; the poisoned ones under partial poisoning), mean over seeds."""
    measured = [r for r in cells if r["status"] == "done" and dig(r["results"], "disentangle", "all")]
    if not measured:
        return []
    axes = _measure_axes(measured)
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = defaultdict(list)
    for r in measured:
        groups[tuple(axis_label(r["config"], a) for a in axes)].append(r)
    blocks = ["all"] + (["subset"] if any(dig(r["results"], "disentangle", "subset") for r in measured) else [])
    s1_body, st_body = [], []
    inputs_seen: set[tuple[Any, ...]] = set()
    for key, g in groups.items():
        for block in blocks:
            reps = [r["results"]["disentangle"].get(block) for r in g]
            reps = [b for b in reps if b]
            if not reps:
                continue
            name = "all" if block == "all" else "poisoned"
            if any(b.get("p_hat") for b in reps):
                ph = [b["p_hat"] for b in reps if b.get("p_hat")]
                cc = [float(np.mean(finite(list((x.get("class_corr") or {}).values())) or [float("nan")]))
                      for x in ph]
                s1_body.append([*key, name, str(reps[0]["n"])] + [
                    _m([x["corr"][q] for x in ph]) for q in ("mean", "q25", "median", "q75")] + [
                    _m([x["energy_removed"] for x in ph], pct=True), _m([x["share"] for x in ph]), _m(cc),
                    _m([b["p_l2"]["mean"] for b in reps]), _m([x["p_hat_l2"]["mean"] for x in ph])])
            for stage in reps[0]["stages"]:
                st = [b["stages"][stage] for b in reps if stage in b["stages"]]
                row_key = list(key)
                if stage == "input":  # the poisoned set itself: the same for every defense, shown once
                    row_key[1] = "(any)"
                    if (tuple(row_key), name) in inputs_seen:
                        continue
                    inputs_seen.add((tuple(row_key), name))
                st_body.append([*row_key, name, stage, _m([x["psnr_to_clean"] for x in st], 2),
                                _m([x["poison_left_share"] for x in st]),
                                _m([x["poison_left_corr"]["mean"] for x in st])])
    out: list[tuple[str, Table]] = []
    if s1_body:
        out.append(("stage1", Table(f"Stage 1: p_hat against the true perturbation p = poisoned - clean — {where}",
                         [*axes, "images", "n", "corr(p_hat, p) mean", "q25", "median", "q75", "energy removed",
                          "share of p in p_hat", "class-mean corr", "mean l2 of p", "mean l2 of p_hat"], s1_body,
                         "corr: per image (images without poison left out); energy removed: 1 - ||p - p_hat||² / "
                         "||p||² over the images (negative: subtracting p_hat adds error); l2 in [0, 1] pixel units")))
    out.append(("stages", Table(f"Every stage against the clean images — {where}",
                     [*axes, "images", "stage", "PSNR to clean (dB)", "poison left (share of p)",
                      "corr(stage - clean, p)"], st_body,
                     "poison left: <stage - clean, p> / <p, p> (1 = all of it, 0 = none); '-' where there is no "
                     "poison (the clean set)")))
    return out


def _is_full_dvae(cfg: dict[str, Any]) -> bool:
    """The whole method (both stages, subtraction in stage 2), not one of its ablations."""
    d = cfg["defense"]
    params = d.get("params") or {}
    return d["name"] == "dvae" and not params.get("skip_stage1") and params.get("stage2_subtract", True) is not False


def ablation_table(cells: list[dict[str, Any]], title: str) -> Table:
    """Tables 5-6 shape: defenses x attacks, accuracy with stage 1's corr(p_hat, p) and energy removed in each
    cell, the mean over the poisons and over the effective ones (defense ``none`` loses >= 10 points to the
    clean set), the best defense per attack, and a note saying where each defense wins and what the clean set
    costs."""
    defs: list[str] = []
    atks: list[str] = []
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    clean_atk: str | None = None
    none_def: str | None = None
    full: set[str] = set()
    for r in cells:
        a, d = axis_label(r["config"], "attack"), axis_label(r["config"], "defense")
        defs += [d] if d not in defs else []
        atks += [a] if a not in atks else []
        groups[(d, a)].append(r)
        if r["config"]["attack"]["name"] == "none":
            clean_atk = a
        if r["config"]["defense"]["name"] == "none":
            none_def = d
        if _is_full_dvae(r["config"]):
            full.add(d)

    def val(d: str, a: str, key: str = "final_acc") -> float | None:
        v = finite([(r["results"] or {}).get(key) for r in groups.get((d, a), []) if r["status"] == "done"])
        return float(np.mean(v)) if v else None

    poisons = [a for a in atks if a != clean_atk]
    base = val(none_def, clean_atk) if none_def and clean_atk else None
    effective = [a for a in poisons if base is not None and none_def is not None
                 and val(none_def, a) is not None and base - val(none_def, a) >= 10]  # type: ignore[operator]
    body = []
    for d in defs:
        line = [d]
        for a in atks:
            acc = val(d, a)
            if acc is None:
                line.append(status_text(groups.get((d, a), [])) or "" if groups.get((d, a)) else "")
                continue
            txt = num(acc)
            r_, e_ = val(d, a, "stage1_corr"), val(d, a, "stage1_energy_removed")
            if r_ is not None or e_ is not None:
                txt += f" [r {num(r_, missing='-')}, E {num(e_, '.0%', '-')}]"
            line.append(txt)
        for subset in (poisons, effective):
            v = [val(d, a) for a in subset]
            line.append(num(np.mean(v)) if subset and all(x is not None for x in v) else "-")
        body.append(line)
    best_line = ["best"]
    wins: dict[str, list[str]] = defaultdict(list)
    for a in atks:
        scored = [(val(d, a), d) for d in defs if val(d, a) is not None and d != none_def]
        if not scored:
            best_line.append("")
            continue
        top = max(v for v, _ in scored)
        winners = [d for v, d in scored if v >= top - 1e-9]
        best_line.append(" / ".join(winners))
        for w in winners:
            wins[w].append(a)
    body.append(best_line + ["", ""])
    notes = ["cell: clean test accuracy (%) [r = corr(p_hat, p) per image, mean; E = poison energy stage 1 removed, "
             "1 - ||p - p_hat||²/||p||²]."]
    notes.append("effective poisons (w/o defense, >= 10 points below the clean set): "
                 + (", ".join(effective) if effective else "none") + ".")
    rates = _rates(cells)
    if rates:
        notes.append("rates (KLD limits, nats): " + "; ".join(f"{d}: {r}" for d, r in rates.items()) + ".")
    won = "; ".join(f"{d} on {', '.join(a)}" for d, a in wins.items())
    notes.append(f"wins (best accuracy; w/o excluded): {won or '-'}.")
    if base is not None and clean_atk is not None:
        cost = [f"{d} {num(base - v)}" for d in defs if d != none_def and (v := val(d, clean_atk)) is not None]
        notes.append(f"cost on the clean set (points below w/o, {num(base)}): " + (", ".join(cost) or "-") + ".")
        for d in sorted(full):
            gaps = [f"{a} {num(base - v)}" for a in effective if (v := val(d, a)) is not None]
            if gaps:
                notes.append(f"{d}: points below clean on the effective poisons: {', '.join(gaps)}.")
    header = ["defense \\ attack", *atks, "Mean (poisons)", "Mean (effective)"]
    return Table(title, header, body, " ".join(notes))


def _rates(cells: list[dict[str, Any]]) -> dict[str, str]:
    """The KLD limits each VAE-family defense actually ran with (from its recorded config), so "at the same rate"
    is checked on the numbers, not on the labels."""
    out: dict[str, str] = {}
    for r in cells:
        cfg = dig(r["results"], "defense_info", "config")
        name = r["config"]["defense"]["name"]
        d = axis_label(r["config"], "defense")
        if not isinstance(cfg, dict) or d in out:
            continue
        applied = dig(r["results"], "defense_info", "kld_limits") or {}  # after rate_rule
        if name == "dvae":
            s1 = "" if cfg.get("skip_stage1") else f"stage 1 {_limit(applied.get('stage1', cfg.get('kld_limit1')))}, "
            out[d] = f"{s1}stage 2 {_limit(applied.get('stage2', cfg.get('kld_limit2')))}"
        elif name == "vae":
            out[d] = f"{_limit(applied.get('vae', cfg.get('kld_limit')))}"
    return out


def _limit(v: Any) -> str:
    return num(v, ".3g") if isinstance(v, float) else str(v)


def disentangle_check_table(cells: list[dict[str, Any]], title: str) -> Table:
    """Per attack: stage 1's corr(p_hat, p) and energy removed beside the Table 1 accuracies of a classifier
    trained on clean + p_hat (T, D, P) and the PSNR of the output to the clean images."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in cells:
        groups[axis_label(r["config"], "attack")].append(r)
    body = []
    for atk, g in groups.items():
        done = [r["results"] for r in g if r["status"] == "done" and r["results"]]
        if not done:
            body.append([atk] + [status_text(g) or ""] * 7)
            continue
        body.append([atk, _m([x.get("stage1_corr") for x in done]),
                     _m([x.get("stage1_energy_removed") for x in done], pct=True),
                     _m([x.get("poison_left") for x in done]),
                     _m([x.get("psnr_clean") for x in done], 2),
                     _m([x.get("acc_clean_train") for x in done], 2),
                     _m([x.get("acc_clean_test") for x in done], 2),
                     _m([x.get("acc_poisoned_train") for x in done], 2)])
    return Table(title, ["attack", "stage-1 corr(p_hat, p)", "energy removed", "poison left (output)",
                         "PSNR output to clean (dB)", "T: clean train", "D: clean test", "P: poisoned"], body,
                 "T, D, P: accuracy (%) of a classifier trained on clean + p_hat (the paper's Table 1): p_hat that is "
                 "the poison gives a low D and a high P.")
