"""The report's sections, one per cell kind (each kind names its own in :mod:`unpoison.bench.kinds`): from a
kind's rows, its tables (Tables 1, 2, 5-8, 13, Sec. 5.2, Theorem 2, the dependencies), figures and image grids."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .figures import fig_bars, fig_frontier, fig_psnr_acc, fig_theorem2
from .paper import is_cifar10, paper_t7
from .table import Table, axis_label, dig, file_tag, metric_table, num, pivot
from .tables import ablation_table, disentangle_check_table, efficacy_table, frontier_table, measurement_tables


@dataclass
class ReportContext:
    """What a kind's report section may read besides its own rows: the grid's folders, metadata and layout."""

    outdir: Path
    rdir: Path
    meta: dict[str, Any]
    spec: dict[str, Any]
    title: str


#: a report section's output: named tables, captioned figures, captioned image grids
Section = tuple[list[tuple[str, Table]], list[tuple[str, Path]], list[tuple[str, Path]]]
SectionFn = Callable[[list[dict[str, Any]], ReportContext], Section]


def _by_run(rows: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    out: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        out[(str(r["config"]["dataset"]), str(r["config"]["model"]))].append(r)
    return out


def purify_section(rows: list[dict[str, Any]], rc: ReportContext) -> Section:
    """Tables 2/5/6/13 and Fig. 2/6: accuracy per attack and defense, PSNR, the per-stage measurements."""
    tables: list[tuple[str, Table]] = []
    figures: list[tuple[str, Path]] = []
    spec, title, rdir, meta = rc.spec, rc.title, rc.rdir, rc.meta
    for (ds, model), cells in _by_run(rows).items():
        tag = file_tag(ds, model)
        if spec.get("layout") == "efficacy":
            tables.append((f"{meta.get('name')}-{tag}", efficacy_table(cells, f"{title} — {ds}, {model}")))
            continue
        if spec.get("layout") in ("ablation", "frontier"):
            tables.append((f"{meta.get('name')}-{tag}", ablation_table(cells, f"{title} — {ds}, {model}")))
            if spec.get("layout") == "frontier":
                tables.append((f"frontier-{tag}", frontier_table(cells, f"Quality vs compute — {ds}, {model}")))
                p = fig_frontier(cells, rdir / "figures" / f"frontier-{tag}.png",
                                 f"accuracy vs purification CPU time — {ds}, {model}")
                if p:
                    figures.append((f"Accuracy vs purification CPU time ({ds}, {model})", p))
            p = fig_bars(pivot(cells, "attack", "defense"), rdir / "figures" / f"bars-{tag}.png",
                         f"per-attack accuracy — {ds}, {model}")
            if p:
                figures.append((f"Per-attack accuracy ({ds}, {model})", p))
            tables += [(f"{n}-{tag}", t) for n, t in measurement_tables(cells, f"{ds}, {model}")]
            continue
        t = pivot(cells, spec.get("rows", "attack"), spec.get("cols", "defense"), title=f"{title} — {ds}, {model}",
                  mean_row=bool(spec.get("mean_row")), mean_col=bool(spec.get("mean_col")),
                  psnr_row=bool(spec.get("psnr_row")), with_paper=is_cifar10(ds) and model == "resnet18")
        tables.append((f"{meta.get('name')}-{tag}", t))
        p = fig_bars(t if spec.get("rows", "attack") == "attack" else
                     pivot(cells, "attack", "defense"), rdir / "figures" / f"bars-{tag}.png",
                     f"per-attack accuracy — {ds}, {model}")
        if p:
            figures.append((f"Per-attack accuracy ({ds}, {model})", p))
        p = fig_psnr_acc(cells, rdir / "figures" / f"psnr-acc-{tag}.png", f"PSNR vs accuracy — {ds}, {model}")
        if p:
            figures.append((f"PSNR vs accuracy ({ds}, {model})", p))
        if any(r["results"] and r["results"].get("psnr") is not None for r in cells):
            tables.append((f"psnr-{tag}", pivot(cells, spec.get("rows", "attack"), spec.get("cols", "defense"),
                                                value="psnr", title=f"PSNR(poisoned, purified) dB — {ds}, {model}")))
        tables += [(f"{n}-{tag}", t) for n, t in measurement_tables(cells, f"{ds}, {model}")]
    return tables, figures, []


def disentangle_section(rows: list[dict[str, Any]], rc: ReportContext) -> Section:
    """Table 1 (clean + p_hat still poisons) and, where measured, how much poison each stage removed."""
    tables: list[tuple[str, Table]] = []
    for (ds, model), cells in _by_run(rows).items():
        body = []
        for key, name in (("acc_clean_train", "clean train T"), ("acc_clean_test", "clean test D"),
                          ("acc_poisoned_train", "poisoned P")):
            body.append([name] + pivot(cells, "model", "attack", value=key).rows[0][1:])
        atks = pivot(cells, "model", "attack").header[1:]
        t = Table(f"Table 1: accuracy (%) of a model trained on clean + p_hat — {ds}, {model}", ["test set", *atks],
                  body)
        tag = file_tag(ds, model)
        tables.append((f"table1-{tag}", t))
        if any(dig(r["results"], "disentangle", "all") for r in cells):
            tables.append((f"disentangle-{tag}", disentangle_check_table(
                cells, f"Does stage 1 take the poison out? — {ds}, {model}")))
            tables += [(f"{n}-{tag}", t) for n, t in measurement_tables(cells, f"{ds}, {model}")]
    return tables, [], []


def detect_section(rows: list[dict[str, Any]], rc: ReportContext) -> Section:
    """Table 7: poisoned-sample detection."""
    tables: list[tuple[str, Table]] = []
    for (ds, model), cells in _by_run(rows).items():
        t = metric_table(cells, f"Table 7: poisoned-sample detection — {ds}, {model}", ["attack", "ratio"],
                          [("det_acc", "Acc."), ("recall", "Recall"), ("precision", "Precision"), ("f1", "F1")],
                          paper=paper_t7 if is_cifar10(ds) else None)
        tables.append((f"table7-{file_tag(ds, model)}", t))
    return tables, [], []


def partial_section(rows: list[dict[str, Any]], rc: ReportContext) -> Section:
    """Table 8: accuracy under partial poisoning, per attack, defense and ratio."""
    tables: list[tuple[str, Table]] = []
    for (ds, model), cells in _by_run(rows).items():
        groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in cells:
            groups[axis_label(r["config"], "attack")].append(r)
        body = []
        header: list[str] = []
        for atk, g in groups.items():
            t = pivot(g, "defense", "ratio")
            header = ["attack", *t.header]
            body += [[atk, *row] for row in t.rows]
        tables.append((f"table8-{file_tag(ds, model)}",
                       Table(f"Table 8: accuracy (%) under partial poisoning — {ds}, {model}", header, body)))
    return tables, [], []


def amplify_section(rows: list[dict[str, Any]], rc: ReportContext) -> Section:
    """Sec. 5.2: the D-VAE-amplified poison."""
    tables: list[tuple[str, Table]] = []
    for (ds, model), cells in _by_run(rows).items():
        t = metric_table(cells, f"Sec. 5.2: D-VAE-amplified poison — {ds}, {model}", ["attack", "ratio"],
                          [("final_acc", "test acc. (amplified)"),
                           ("acc_small_poison_only", "test acc. (small poison)")],
                          digits=2)
        tables.append((f"amplify-{file_tag(ds, model)}", t))
    return tables, [], []


def theorem2_section(rows: list[dict[str, Any]], rc: ReportContext) -> Section:
    """Theorem 2's bounds against the numerical KLD, table and plot (the first finished cell)."""
    tables: list[tuple[str, Table]] = []
    figures: list[tuple[str, Path]] = []
    for r in rows:
        if r["status"] == "done":
            res = r["results"]
            body = [[num(x["r"], ".4g"), num(x["lower"], ".6f"), num(x["kld"], ".6f"), num(x["upper"], ".6f"),
                     "yes" if x["holds"] else "NO"] for x in res["rows"]]
            tables.append(("theorem2", Table(
                "Theorem 2: ½ln(1+r²) − ln2 ≤ KLD ≤ ½ln(1+r²)", ["r", "lower", "KLD (numerical)", "upper", "holds"],
                body, f"all hold: {res['all_hold']}; KLD increasing in r: {res['kld_increasing_in_r']}")))
            figures.append(("Theorem 2", fig_theorem2(res, rc.rdir / "figures" / "theorem2.png")))
            break
    return tables, figures, []


def diffusion_section(rows: list[dict[str, Any]], rc: ReportContext) -> Section:
    """The dependency cells: the diffusion models AVATAR denoises with."""
    deps = rows
    tables: list[tuple[str, Table]] = []
    if deps:
        tables.append(("dependencies", Table(
            "Dependencies: diffusion models the AVATAR cells denoise with",
            ["cell", "status", "final loss", "parameters (M)"],
            [[r["key"], r["status"], num((r["results"] or {}).get("final_loss"), ".4f"),
              num((r["results"] or {}).get("parameters"), scale=1e-6)] for r in deps])))
    return tables, [], []
