"""Benchmark configs -> cells.

A config (a shipped name such as ``table2`` or a YAML path) names *axes*; the grid is their product.
Each cell is one experiment: ``dataset x attack x defense x model x seed`` (plus any extra axis such
as ``ratio``), with per-cell parameters. ``kind`` selects the experiment function (``purify`` by
default; ``detect``, ``disentangle``, ``partial``, ``amplify``, ``theorem2`` for the other tables).

Config shape (every key optional except ``axes``)::

    name: table2
    title: "Table 2: clean test accuracy (%)"
    kind: purify
    table: {rows: attack, cols: defense}         # how the report lays the cells out
    plugins: [my_pkg.my_attacks, ./extra.py]      # imported in every worker (register your own names)
    axes:
      dataset: [cifar10]                          # dataset specs (see unpoison.data.load_dataset)
      attack: [none, em, {name: lsp, eps: 2.0, label: lsp-l2=2}]
      defense: [none, {name: jpeg, params: {quality: 10}, label: JPEG-10}, at, dvae]
      model: [resnet18]
      seed: [0]
    subset: {n_train: 5000, n_test: 1000, seed: 0}
    train: {preset: paper, epochs: 60}            # TrainConfig preset + overrides
    attack_params: {em: {...}}                    # merged into every entry of that attack
    defense_params: {dvae: {...}}                 # merged into every entry of that defense
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

from ..errors import UserError

CONFIG_DIR = Path(__file__).parent / "configs"
PRESETS = ("smoke", "cpu", "paper")
#: axes every cell has (filled with defaults when a config leaves them out)
CORE_AXES = ("dataset", "attack", "defense", "model", "seed")
_TOP_KEYS = {"name", "title", "kind", "table", "plugins", "axes", "subset", "train", "attack_params",
             "defense_params", "params", "resources", "presets", "description", "device", "cells",
             "attack_preset"}


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


def load_config(spec: str | Path, preset: str | None = None, datasets: list[str] | None = None) -> dict[str, Any]:
    """Read a shipped config by name or a YAML file, apply ``preset`` (deep merge) and ``datasets``
    (replaces the dataset axis: run any config on your own data)."""
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
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise UserError(f"unknown config key(s) {', '.join(unknown)}; known: {', '.join(sorted(_TOP_KEYS))}", path)
    presets = raw.pop("presets", {}) or {}
    if preset is not None:
        if preset not in PRESETS:
            raise UserError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
        if preset not in presets:
            raise UserError(f"config has no preset {preset!r} (it has: {', '.join(presets) or 'none'})", path)
        raw = deep_merge(raw, presets[preset] or {})
    if datasets:
        raw.setdefault("axes", {})["dataset"] = list(datasets)
    raw.setdefault("name", path.stem)
    raw["_source"] = str(path)
    raw["_preset"] = preset
    # plugin paths are relative to the config file
    raw["plugins"] = [str((path.parent / p).resolve()) if str(p).endswith(".py") else str(p)
                      for p in raw.get("plugins", []) or []]
    return raw


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
    """One experiment: everything :func:`unpoison.bench.run.run_cell` needs, JSON-able."""

    key: str
    index: int
    config: dict[str, Any] = field(default_factory=dict)

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
    extra = sorted(set(value) - {"name", "label", "params", "eps", "ratio"})
    if extra:
        raise UserError(f"bad {axis} entry {value!r}: unknown key(s) {', '.join(extra)}")
    out = {"name": str(value["name"]).lower(), "params": dict(value.get("params") or {})}
    if "eps" in value:
        out["eps"] = value["eps"]
    if "ratio" in value:
        out["ratio"] = value["ratio"]
    out["label"] = str(value.get("label") or _auto_label(out))
    return out


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
    return cells


def _default_model(train: dict[str, Any]) -> str:
    if train.get("model"):
        return str(train["model"])
    return {"paper": "resnet18", "cpu": "smallcnn", "smoke": "tinycnn"}.get(str(train.get("preset", "smoke")),
                                                                           "resnet18")


def fingerprint(cells: list[Cell]) -> str:
    """Identifies a grid: the same config + preset gives the same fingerprint on any machine."""
    return short_hash([[c.key, c.config] for c in cells], 16)


def validate(cells: list[Cell], source: str | None = None) -> None:
    """Unknown names (kinds, attacks, defenses, models, datasets, parameters) -> one-line UserError."""
    from ..data import DATASETS, FORMATS
    from ..defenses import DEFENSES, TRAIN_DEFENSES
    from ..models import MODELS
    from .run import KINDS, attack_registry

    attacks = attack_registry()
    for cell in cells:
        c = cell.config
        where = f"cell {cell.key!r}"
        KINDS.get(c["kind"])
        MODELS.get(c["model"])
        ds = str(c["dataset"])
        name, sep, _ = ds.partition(":")
        known_ds = name.lower() in DATASETS or (sep and name.lower() in FORMATS)
        if not known_ds and not Path(ds).expanduser().exists():
            raise UserError(f"{where}: unknown dataset {ds!r} (not a registered name, FORMAT:PATH or existing path); "
                            f"known names: {', '.join(DATASETS.names())}", source)
        a = c["attack"]["name"]
        if a != "none" and (attacks is None or a not in attacks):
            known = ", ".join(attacks.names()) if attacks is not None else "none (unpoison.attacks missing)"
            raise UserError(f"{where}: unknown attack {a!r}; known: none, {known}", source)
        d = c["defense"]["name"]
        if d == "none":
            continue
        if d in DEFENSES:
            cls = DEFENSES.get(d)
            allowed = set(cls.PARAMS) | set(cls.COMMON)
            bad = sorted(set(c["defense"]["params"]) - allowed) if cls.PARAMS else []
            if bad:
                raise UserError(f"{where}: defense {d!r} has no parameter(s) {', '.join(bad)}; "
                                f"known: {', '.join(sorted(cls.PARAMS))}", source)
        elif d not in TRAIN_DEFENSES:
            known = ", ".join(["none", *DEFENSES.names(), *TRAIN_DEFENSES.names()])
            raise UserError(f"{where}: unknown defense {d!r}; known: {known}", source)
        if c["train"].get("preset", "smoke") not in PRESETS:
            raise UserError(f"{where}: unknown training preset {c['train'].get('preset')!r}", source)
