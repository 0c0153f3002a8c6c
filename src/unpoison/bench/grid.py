"""Benchmark configs -> cells.

A config (a shipped name such as ``table2`` or a YAML path) names *axes*; the grid is their product.
Each cell is one experiment: ``dataset x attack x defense x model x seed`` (plus any extra axis such
as ``ratio``), with per-cell parameters. ``kind`` selects the experiment (:data:`unpoison.bench.kinds.KINDS`;
``purify`` by default). This module only reads and expands configs; :mod:`unpoison.bench.check` validates the
cells and :func:`unpoison.bench.run.run_cell` runs each.

Config shape (every key optional except ``axes``)::

    name: table2
    title: "Table 2: clean test accuracy (%)"
    note: "AVATAR left out: ..."                  # printed under the report's title
    kind: purify
    table: {rows: attack, cols: defense}         # how the report lays the cells out (layout: grid|efficacy|ablation)
    plugins: [my_pkg.my_attacks, ./extra.py]      # Python code: imported only with --allow-plugins
    axes:
      dataset: [cifar10]                          # dataset specs (see unpoison.data.load_dataset)
      attack: [none, em, {name: lsp, eps: 2.0, label: lsp-l2=2}]   # {name: em, seed: 0}: one poison for every
                                                  # cell seed (the usual "poison once, train N seeds")
      defense: [none, {name: jpeg, params: {quality: 10}, label: JPEG-10}, {name: at, train: {epochs: 5}}, dvae]
      model: [resnet18]
      seed: [0]
    subset: {n_train: 5000, n_test: 1000, seed: 0}
    train: {preset: paper, epochs: 60}            # TrainConfig preset + overrides (unknown keys are errors)
    attack_preset: cpu                            # every attack's preset
    attack_params: {em: {...}}                    # merged into every entry of that attack
    defense_params: {dvae: {...}}                 # merged into every entry of that defense
    diffusion: {preset: paper}                    # AVATAR without a checkpoint: a dependency cell trains one
    params: {...}                                 # kind-specific parameters (e.g. detection's)
    resources: {num_cpus: 1, num_gpus: 0}         # what the Ray executor asks for per cell; num_gpus > 1
                                                  # (or nproc: N): the purifier runs data-parallel, N ranks
    presets: {smoke: {...}, cpu: {...}, paper: {...}}   # deep-merged over the above
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import importlib.util
import itertools
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..defenses import DEFENSES
from ..errors import UserError
from ..params import unknown
from ..presets import PresetTable, register_presets
from ..train import TrainConfig

CONFIG_DIR = Path(__file__).parent / "configs"
#: a grid's presets: the values live in each config's ``presets:`` section
BENCH_PRESETS = register_presets(PresetTable(
    "bench", {"smoke": {}, "cpu": {}, "paper": {}},
    help="benchmark grids (smoke: tiny synthetic data; cpu: Fashion-MNIST subsets; paper: the paper's runs)"))
PRESETS = tuple(BENCH_PRESETS.names())
_TOP_KEYS = {"name", "title", "note", "kind", "table", "plugins", "axes", "subset", "train", "attack_params",
             "defense_params", "params", "resources", "presets", "description", "device", "cells",
             "attack_preset", "diffusion"}
#: keys of an attack / defense entry on an axis
_ENTRY_KEYS = {"name", "label", "params", "eps", "ratio", "train", "seed"}


def shipped_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def short_hash(obj: Any, n: int = 12) -> str:
    return hashlib.sha256(canonical(obj).encode()).hexdigest()[:n]


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` wins; nested dicts merge, lists and scalars are replaced."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_config(spec: str | Path, preset: str | None = None, datasets: list[str] | None = None,
                device: str = "auto") -> dict[str, Any]:
    """Read a shipped config by name or a YAML file, apply ``preset`` (deep merge; ``auto`` = ``paper`` on
    CUDA, ``cpu`` otherwise; ``None`` = as written) and ``datasets`` (replaces the dataset axis: run any
    config on your own data). Plugins are listed in ``cfg["plugins"]``, never imported here."""
    s = str(spec)
    path = Path(s).expanduser()
    if not path.exists() and (CONFIG_DIR / f"{s}.yaml").exists():
        path = CONFIG_DIR / f"{s}.yaml"
    if not path.exists():
        raise UserError(f"no such config (shipped: {', '.join(shipped_configs())})", s)
    try:
        raw = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"not valid YAML: {str(e).splitlines()[0]}", path) from None
    if not isinstance(raw, dict):
        raise UserError("a config must be a YAML mapping", path)
    _check_top_keys(raw, path)
    presets = raw.pop("presets", {}) or {}
    if not isinstance(presets, dict):
        raise UserError("'presets' must map preset names to mappings", path)
    for name, over in presets.items():
        if name not in PRESETS:
            raise UserError(f"{unknown('preset', name, PRESETS)} (in 'presets')", path)
        _check_top_keys(over or {}, path, f"preset {name!r}: ")
    chosen = None
    if preset is not None:
        chosen = BENCH_PRESETS.resolve(preset, device)
        if chosen not in presets:
            if preset == "auto" and not presets:
                chosen = None  # a config without presets runs as written
            else:
                raise UserError(f"config has no preset {chosen!r} (it has: {', '.join(presets) or 'none'})", path)
        if chosen is not None:
            raw = deep_merge(raw, presets[chosen] or {})
    if datasets:
        raw.setdefault("axes", {})["dataset"] = list(datasets)
    raw.setdefault("name", path.stem)
    raw["_source"] = str(path)
    raw["_preset"] = chosen
    raw["_presets"] = sorted(presets)
    # plugin paths are relative to the config file
    raw["plugins"] = [str((path.parent / p).resolve()) if str(p).endswith(".py") else str(p)
                      for p in raw.get("plugins", []) or []]
    return raw


def _check_top_keys(raw: dict[str, Any], path: Path, where: str = "") -> None:
    if not isinstance(raw, dict):
        raise UserError(f"{where}a config section must be a YAML mapping", path)
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise UserError(f"{where}unknown config key(s) {', '.join(unknown)}; known: {', '.join(sorted(_TOP_KEYS))}",
                        path)


def require_plugins_allowed(cfg: dict[str, Any], allow: bool) -> None:
    """A config is data: the Python modules it lists run only when the user opts in."""
    if cfg.get("plugins") and not allow:
        raise UserError(f"config lists plugins ({', '.join(map(str, cfg['plugins']))}): Python code it would import "
                        "and run; pass --allow-plugins if you trust it", cfg.get("_source"))


def import_plugins(plugins: list[str]) -> None:
    """Import modules (dotted names or ``.py`` files) that register extra datasets/attacks/defenses."""
    for p in plugins:
        if p.endswith(".py"):
            name = "unpoison_plugin_" + short_hash(p, 8)
            if name in sys.modules:
                continue
            if not Path(p).exists():
                raise UserError("plugin file not found", p)
            spec = importlib.util.spec_from_file_location(name, p)
            assert spec is not None and spec.loader is not None
            mod = importlib.util.module_from_spec(spec)
            sys.modules[name] = mod
            spec.loader.exec_module(mod)
        else:
            try:
                importlib.import_module(p)
            except ModuleNotFoundError as e:
                raise UserError(f"plugin module {p!r} not found: {e}") from None


@dataclass
class Cell:
    """One experiment: everything :func:`unpoison.bench.run.run_cell` needs, JSON-able.

    ``data`` is the content digest of the cell's dataset (filled by the check before a run): a finished
    cell counts as finished only for the data it was computed on. It is not part of :attr:`id`.
    """

    key: str
    index: int
    config: dict[str, Any] = field(default_factory=dict)
    data: str = ""

    @property
    def id(self) -> str:
        """A file-system-safe id (the cell's folder and caches are named by it)."""
        return short_hash(self.config)


def _entry(value: Any, axis: str) -> dict[str, Any]:
    """Normalise an attack/defense axis entry to ``{name, label, params[, eps]}``."""
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict) or "name" not in value:
        raise UserError(f"bad {axis} entry {value!r}: expected a name or a mapping with 'name'")
    extra = sorted(set(value) - _ENTRY_KEYS)
    if extra:
        raise UserError(f"bad {axis} entry {value!r}: unknown key(s) {', '.join(extra)}")
    for k in ("params", "train"):
        if not isinstance(value.get(k) or {}, dict):
            raise UserError(f"bad {axis} entry {value!r}: {k!r} must be a mapping")
    if "seed" in value and (axis != "attack" or isinstance(value["seed"], bool)
                            or not isinstance(value["seed"], int) or value["seed"] < 0):
        raise UserError(f"bad {axis} entry {value!r}: 'seed' is an attack's own seed, a non-negative integer")
    out = {"name": str(value["name"]).lower(), "params": dict(value.get("params") or {})}
    for k in ("eps", "ratio", "train", "seed"):
        if k in value:
            out[k] = value[k]
    out["label"] = str(value.get("label") or _auto_label(out))
    return out


def attack_seed(c: dict[str, Any]) -> int:
    """The seed a cell poisons with: its attack entry's own ``seed`` when given (one poison shared by the cells
    of every training seed, so replicates vary the purifier and the judge, not the crafted poison), else the
    cell's seed."""
    return int(c["attack"].get("seed", c.get("seed", 0)))


def _auto_label(e: dict[str, Any]) -> str:
    bits = [f"{k}={v}" for k, v in sorted(e["params"].items())]
    if "eps" in e:
        bits.insert(0, f"eps={e['eps']}")
    return e["name"] + (f"({','.join(bits)})" if bits else "")


def _scalar_label(v: Any) -> str:
    if isinstance(v, dict):
        return str(v.get("label") or canonical(v))
    return str(v)


def expand(cfg: dict[str, Any]) -> list[Cell]:
    """The product of the axes (plus explicit ``cells``), each cell a JSON-able dict; labels unique."""
    axes = dict(cfg.get("axes") or {})
    if not axes and not cfg.get("cells"):
        raise UserError("config has no 'axes'", cfg.get("_source"))
    for k, default in (("dataset", ["synthetic"]), ("attack", ["none"]), ("defense", ["none"]),
                       ("model", [None]), ("seed", [0])):
        axes.setdefault(k, default)
    for k, v in axes.items():
        if not isinstance(v, list) or not v:
            raise UserError(f"axis {k!r} must be a non-empty list", cfg.get("_source"))
    names = list(axes)
    combos = [dict(zip(names, vals)) for vals in itertools.product(*(axes[n] for n in names))]
    for extra in cfg.get("cells") or []:
        if not isinstance(extra, dict):
            raise UserError(f"bad entry in 'cells': {extra!r}", cfg.get("_source"))
        combos.append({**{n: axes[n][0] for n in names}, **extra})
    base = {
        "kind": cfg.get("kind", "purify"),
        "subset": cfg.get("subset") or {},
        "train": cfg.get("train") or {"preset": "smoke"},
        "params": cfg.get("params") or {},
        "resources": cfg.get("resources") or {},
        "plugins": cfg.get("plugins") or [],
        "device": cfg.get("device", "auto"),
        "attack_preset": cfg.get("attack_preset"),
    }
    for k in ("subset", "train", "params", "resources"):
        if not isinstance(base[k], dict):
            raise UserError(f"{k!r} must be a mapping", cfg.get("_source"))
    cells: list[Cell] = []
    seen: dict[str, int] = {}
    for i, combo in enumerate(combos):
        c = copy.deepcopy(base)
        labels = []
        for n, v in combo.items():
            if n in ("attack", "defense"):
                e = _entry(v, n)
                shared = (cfg.get(f"{n}_params") or {}).get(e["name"]) or {}
                e["params"] = {**shared, **e["params"]}
                c[n] = e
                labels.append(f"{n}={e['label']}")
            elif n == "kind":
                c["kind"] = v
            else:
                c[n] = v.get("value", v) if isinstance(v, dict) and "value" in v else v
                if isinstance(v, dict) and "label" in v:
                    c[f"{n}_label"] = v["label"]
                labels.append(f"{n}={_scalar_label(v)}")
        c["model"] = c.get("model") or _default_model(c["train"])
        key = f"{c['kind']}|" + "|".join(labels)
        if key in seen:
            raise UserError(f"two cells share the label {key!r}; give entries distinct 'label's", cfg.get("_source"))
        seen[key] = i
        cells.append(Cell(key=key, index=i, config=c))
    return cells + _dependency_cells(cells, cfg, len(combos))


def _dependency_cells(cells: list[Cell], cfg: dict[str, Any], start: int) -> list[Cell]:
    """Cells the grid must finish first, as each defense declares them (:class:`unpoison.defenses.base.Dependency`;
    AVATAR without a ``checkpoint`` gets its DDPM from a ``train-diffusion`` cell per (dataset, subset, seed),
    trained on that dataset's clean training split with the config's ``diffusion:`` settings). Dependents name
    it in ``needs``."""
    deps: dict[str, Cell] = {}
    for cell in cells:
        c = cell.config
        name = c["defense"]["name"]
        dep = DEFENSES.get(name).DEPENDENCY if name in DEFENSES else None
        if dep is None or c["defense"]["params"].get(dep.param) or not cfg.get(dep.config_key):
            continue
        dep_cfg = {"kind": dep.kind, "dataset": c["dataset"], "subset": c["subset"], "seed": c["seed"],
                   dep.config_key: cfg[dep.config_key], "device": c["device"], "resources": c["resources"],
                   "plugins": c["plugins"],
                   "attack": {"name": "none", "label": "none", "params": {}},
                   "defense": {"name": "none", "label": "none", "params": {}}, "model": None, "params": {},
                   "train": {}, "attack_preset": None}
        key = f"{dep.kind}|dataset={c.get('dataset_label', c['dataset'])}|seed={c['seed']}"
        if key not in deps:
            deps[key] = Cell(key=key, index=start + len(deps), config=dep_cfg)
        c["needs"] = [key]
        c[dep.cell_key] = deps[key].id
    return list(deps.values())


def _default_model(train: dict[str, Any]) -> str:
    if train.get("model"):
        return str(train["model"])
    return TrainConfig.preset(str(train.get("preset", "smoke"))).model


def fingerprint(cells: list[Cell]) -> str:
    """Identifies a grid: the same config + preset gives the same fingerprint on any machine."""
    return short_hash([[c.key, c.config] for c in cells], 16)
