"""The check before a grid starts: a grid that cannot finish does not start.

``unpoison bench CONFIG --check`` runs it alone; every run runs it before its first cell. For every
cell it builds what the cell will build, without training anything: the dataset is loaded (and its
content digest taken, which keys finished cells and caches), the attack and the purifier or
training-time defense are constructed from their parameters (unknown, missing or out-of-range ones
fail here), files they will read must exist (AVATAR's diffusion checkpoint, unless a dependency cell
trains it), the classifier is built for the data's shape, the scoring config is resolved (unknown
keys fail), the kind's own ``params`` are checked, and the D-VAE's geometry must fit the images.
Problems are collected, not stopped at, so one check lists them all.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..attacks import make_attack
from ..attacks.base import check_eps
from ..defenses import DEFENSES, TRAIN_DEFENSES, make_train_defense
from ..defenses.avatar import DIFFUSION_PRESETS
from ..defenses.base import require_packages
from ..errors import UserError
from ..models import create_model
from ..params import check_params, unknown
from ..tensors import rng_scope
from ..utils import parse_fraction
from .cell import cell_purifier, load_for_cell, subset_args, train_config
from .grid import Cell, attack_seed
from .kinds import KINDS, Kind

#: the report's ``table:`` keys
_TABLE_KEYS = {"rows", "cols", "mean_row", "mean_col", "psnr_row", "layout"}
_LAYOUTS = ("grid", "efficacy", "ablation", "frontier")
_DIFFUSION_KEYS = {"preset", "epochs", "batch_size", "lr", "flip"}


@dataclass
class DataFacts:
    """What the check learned about one (dataset, subset): shape, classes, sizes, content digest."""

    shape: tuple[int, int, int]
    num_classes: int
    n_train: int
    n_test: int
    digest: str


def check_grid(cells: list[Cell], cfg: dict[str, Any]) -> list[str]:
    """Validate every cell (see module doc); fill each cell's ``data`` digest; return the problems found
    (one line each; a problem shared by several cells is listed once, naming the first cell and the count)."""
    load_for_cell.cache_clear()  # the files behind the specs may have changed since an earlier grid in this process
    found: dict[str, list[str]] = {}
    general = _check_table(cfg)
    facts: dict[tuple[Any, ...], DataFacts | None] = {}
    built: set[tuple[Any, ...]] = set()
    for cell in cells:
        c = cell.config
        try:
            k = KINDS.get(c["kind"])
        except UserError as e:
            found.setdefault(str(e), []).append(cell.key)
            continue
        data: DataFacts | None = None
        if k.data:
            arg = subset_args(c)
            if arg not in facts:
                facts[arg] = _data_facts(arg, general)
            data = facts[arg]
            if data is None:
                continue  # the dataset's own problem is listed once
            cell.data = data.digest
        for step in _steps(k):
            try:
                step(cell, k, data, built)
            except UserError as e:
                found.setdefault(str(e), []).append(cell.key)
    return general + [f"cell {keys[0]!r}" + (f" (and {len(keys) - 1} more)" if len(keys) > 1 else "") + f": {msg}"
                      for msg, keys in found.items()]


def _data_facts(arg: tuple[Any, ...], problems: list[str]) -> DataFacts | None:
    try:
        ds, digest = load_for_cell(*arg)
    except UserError as e:
        problems.append(f"dataset {arg[0]!r}: {e}")
        return None
    if not ds.has_test:
        problems.append(f"dataset {arg[0]!r}: has no test split to score on")
        return None
    return DataFacts(ds.image_shape, ds.num_classes, len(ds.x_train), len(ds.x_test), digest)  # type: ignore[arg-type]


def _check_table(cfg: dict[str, Any]) -> list[str]:
    t = cfg.get("table") or {}
    if not isinstance(t, dict):
        return ["'table' must be a mapping"]
    out = [f"table: {unknown('key', k, sorted(_TABLE_KEYS))}" for k in sorted(set(t) - _TABLE_KEYS)]
    if t.get("layout", "grid") not in _LAYOUTS:
        out.append(f"table: {unknown('layout', t.get('layout'), _LAYOUTS)}")
    axes = set(cfg.get("axes") or {}) | {"dataset", "attack", "defense", "model", "seed"}
    for k in ("rows", "cols"):
        if k in t and t[k] not in axes:
            out.append(f"table: {k} {t[k]!r} is not an axis ({', '.join(sorted(axes))})")
    return out


def _steps(k: Kind) -> list[Any]:
    """The checks a cell of kind ``k`` gets (its declared ``checks``), each run on its own so that one cell can
    show several problems."""
    steps = {"params": _step_params, "train": _step_train, "attack": _step_attack, "defense": _step_defense,
             "diffusion": _step_diffusion}
    return [steps[n] for n in k.checks]


def _step_params(cell: Cell, k: Kind, data: DataFacts | None, built: set[tuple[Any, ...]]) -> None:
    check_params(cell.config.get("params") or {}, k.params, f"kind {k.name!r}")


def _step_diffusion(cell: Cell, k: Kind, data: DataFacts | None, built: set[tuple[Any, ...]]) -> None:
    _check_diffusion(cell.config.get("diffusion") or {})


def _step_train(cell: Cell, k: Kind, data: DataFacts | None, built: set[tuple[Any, ...]]) -> None:
    if data is not None:
        _check_train(cell.config, data, built)


def _step_attack(cell: Cell, k: Kind, data: DataFacts | None, built: set[tuple[Any, ...]]) -> None:
    if data is not None:
        _ratio(cell.config, k, data.n_train)
        _check_attack(cell.config, data)


def _step_defense(cell: Cell, k: Kind, data: DataFacts | None, built: set[tuple[Any, ...]]) -> None:
    if data is not None:
        _check_defense(cell.config, k, data)


def _ratio(c: dict[str, Any], k: Kind, n: int) -> float:
    """The cell's poison ratio; it must poison at least one of the ``n`` training images."""
    r = c["attack"].get("ratio", c.get("ratio", k.ratio))
    try:
        r = float(r)
    except (TypeError, ValueError):
        raise UserError(f"ratio must be a number, got {r!r}") from None
    if not 0 < r <= 1:
        raise UserError(f"ratio must be in (0, 1], got {r}")
    if round(r * n) < 1:
        raise UserError(f"ratio {r} of {n} training images poisons none")
    return r


def _check_train(c: dict[str, Any], data: DataFacts, built: set[tuple[Any, ...]]) -> None:
    cfg = train_config(c)  # what the cell will score with
    if cfg.epochs < 1 or cfg.batch_size < 1 or not cfg.lr > 0:
        raise UserError(f"train: epochs and batch_size must be >= 1 and lr > 0, got {cfg.epochs}, {cfg.batch_size}, "
                        f"{cfg.lr}")
    h, w, ch = data.shape
    key = (cfg.model, data.num_classes, ch, max(h, w))
    if key not in built:
        with rng_scope(0):
            create_model(cfg.model, data.num_classes, ch, max(h, w))
        built.add(key)


def _check_attack(c: dict[str, Any], data: DataFacts) -> None:
    a = c["attack"]
    if a["name"] == "none":
        return
    kw = dict(a["params"])
    if c.get("attack_preset"):
        kw.setdefault("preset", c["attack_preset"])
    eps = None if a.get("eps") is None else parse_fraction(a["eps"], "eps")
    atk = make_attack(a["name"], eps=eps, seed=attack_seed(c), device=c.get("device", "auto"),
                      progress=False, **kw)
    h, w, ch = data.shape
    check_eps(atk.norm_used, atk.effective_eps(data.shape), h * w * ch, h * w)
    if data.num_classes < 2:
        raise UserError("poisoning needs at least 2 classes")


def _check_defense(c: dict[str, Any], k: Kind, data: DataFacts) -> None:
    d = c["defense"]
    name = d["name"]
    if k.detector:
        p = c.get("params") or {}
        det = p.get("detector", "dvae")
        dparams = p.get("detector_params", d["params"] if name == "dvae" else {}) or {}
        _purifier(det, dparams, c, data, need="stage1", what="detector ")
    if name == "none":
        if k.defense in ("stage1", "apply") and k.builds_defense:
            _purifier("dvae", {}, c, data, need=k.defense)
        return
    if name in DEFENSES:
        if k.defense == "none":
            raise UserError(f"kind {k.name!r} takes no defense, got {name!r}")
        if k.builds_defense:
            _purifier(name, d["params"], c, data, need=k.defense)
    elif name in TRAIN_DEFENSES:
        if k.defense != "any":
            raise UserError(f"kind {k.name!r} needs a purifier, not the training-time defense {name!r}")
        make_train_defense(name, **d["params"])
    else:
        raise unknown("defense", name, ["none", *DEFENSES.names(), *TRAIN_DEFENSES.names()])


def _purifier(name: str, params: dict[str, Any], c: dict[str, Any], data: DataFacts, need: str,
              what: str = "") -> None:
    """Build the purifier as the cell will (:func:`~unpoison.bench.cell.cell_purifier`; ``__init__`` does no I/O,
    so the placeholder paths are not touched) and check what its tags and files promise."""
    cls = DEFENSES.get(name)
    if need == "apply" and cls.tags.p_hat != "infer":
        raise UserError(f"{what}defense {name!r} cannot infer p_hat on new images (no estimate_perturbation)")
    dep = cls.DEPENDENCY
    dep_file = f"<made by the grid's {dep.kind} cell>" if dep is not None else None
    try:
        pur = cell_purifier(c, name, params, "<the cell's checkpoint folder>", dep_file)
    except UserError as e:
        hint = (f" (or give the config a top-level '{dep.config_key}:' so the grid makes one first)"
                if dep is not None else "")
        raise UserError(f"{what}{e}{hint}") from None
    require_packages(name)
    for f in pur.required_files():
        if f != dep_file and not Path(f).expanduser().is_file():
            raise UserError(f"{what}defense {name!r} needs the file {f}, which does not exist")
    pur.check_input(data.shape)


def _check_diffusion(d: dict[str, Any]) -> None:
    if not isinstance(d, dict):
        raise UserError("'diffusion' must be a mapping")
    bad = sorted(set(d) - _DIFFUSION_KEYS)
    if bad:
        raise UserError(f"diffusion: unknown key(s) {', '.join(bad)}; known: {', '.join(sorted(_DIFFUSION_KEYS))}")
    DIFFUSION_PRESETS.values(d.get("preset", "auto"), {k: d.get(k) for k in ("epochs", "batch_size", "lr")})
    require_packages("avatar")  # the DDPM is AVATAR's
