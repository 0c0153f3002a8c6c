"""The purifier interface (scikit-learn's shape) and the defense registries.

A *purifier* is a pre-training defense: configured in ``__init__``, learned by :meth:`fit` (a no-op
for fixed transforms such as JPEG), applied by :meth:`purify` (:meth:`fit_purify` does both). Inputs and
outputs are uint8 ``N x H x W x C`` numpy arrays (torch tensors are accepted and converted).

A *training-time defense* (adversarial training, UEraser) is a callable ``(model, x, y) -> x'``
that the scoring protocol applies to every batch (see :data:`unpoison.train.TrainDefense`).

What each class can do (labels, checkpoints, streaming, p_hat, optional packages) is its ``tags``
(:class:`unpoison.tags.Tags`); :func:`make_purifier` is the one way to build a purifier.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._registry import Registry
from .._validate import as_labels, as_uint8_nhwc
from ..errors import UserError
from ..params import Param, check_params
from ..presets import show_value
from ..tags import Tags
from ..tensors import TrainDefense


@dataclass(frozen=True)
class Dependency:
    """A file a defense needs that a benchmark grid can make first, in a cell of its own (AVATAR's DDPM):
    when a cell's ``param`` is empty and the grid config has a ``config_key:`` section, the grid adds one
    ``kind`` cell per (dataset, subset, seed) sized by that section, and the cell reads ``file`` from it."""

    kind: str
    config_key: str
    param: str
    file: str

    @property
    def cell_key(self) -> str:
        """The dependent cell's config entry naming the dependency cell's id."""
        return f"{self.config_key}_cell"


class Purifier:
    """Base class. Subclasses implement ``_transform`` (and ``_fit`` when they learn something).

    After :meth:`purify`, ``stages_`` holds named intermediate batches (for the image grid, e.g.
    ``{"after stage 1": x1}``), ``extras_`` holds arrays worth saving (e.g. ``{"p_hat": ...}``)
    and ``info_`` a JSON-able dict (per-stage PSNR, losses). ``tags`` says what the class can do
    (:class:`~unpoison.tags.Tags`: whether it needs ``y``, checkpoints, streams, exposes ``p_hat``).
    """

    name: str = ""
    #: method parameters (type, default, range, help): the CLI flags, the bench check and the API read them
    PARAMS: Mapping[str, Param] = {}
    #: which common settings (device, seed, progress, preset) ``__init__`` accepts; :func:`make_purifier` passes them
    COMMON: frozenset[str] = frozenset()
    #: what the class can do, declared once (read by the builders, the pipeline, detection, the bench check)
    tags: Tags = Tags()

    def __init__(self, **params: Any) -> None:
        declared = {k: v for k, v in params.items() if k in self.PARAMS}  # the rest: common settings (seed, ...)
        self.params = {**params, **check_params(declared, self.PARAMS, f"defense {self.name!r}")}
        self.stages_: dict[str, np.ndarray] = {}
        self.extras_: dict[str, np.ndarray] = {}
        self.info_: dict[str, Any] = {}

    def get_params(self) -> dict[str, Any]:
        return dict(self.params)

    #: a file a benchmark grid can make for this defense first (see :class:`Dependency`); None: none
    DEPENDENCY: Dependency | None = None
    #: the smallest settings (preset and parameters) that still run every code path (see :meth:`smoke`)
    SMOKE: dict[str, Any] = {}

    @classmethod
    def smoke(cls, workdir: Path, image_shape: tuple[int, int, int]) -> dict[str, Any]:
        """Settings for a quick build on tiny images of ``image_shape`` (the contract test,
        tests/test_contract.py); a purifier that needs a file makes one in ``workdir``."""
        return dict(cls.SMOKE)

    def check_input(self, image_shape: tuple[int, int, int]) -> None:
        """Raise :class:`UserError` if images of ``image_shape`` (H, W, C) cannot be purified (no data needed)."""

    def required_files(self) -> list[str]:
        """Files :meth:`fit`/:meth:`purify` will read (checked before a benchmark grid starts)."""
        return []

    @classmethod
    def param_defaults(cls) -> dict[str, str]:
        """Each parameter's default as ``--help`` shows it (subclasses with presets show them per preset)."""
        return {k: show_value(p.default) for k, p in cls.PARAMS.items()}

    def fit(self, x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor | None = None) -> Purifier:
        xx = as_uint8_nhwc(x)
        yy = as_labels(y, len(xx))
        if self.tags.labels and yy is None:
            raise UserError(f"{self.name} needs labels y")
        self._fit(xx, yy)
        return self

    def purify(self, x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor | None = None) -> np.ndarray:
        xx = as_uint8_nhwc(x)
        yy = as_labels(y, len(xx))
        if self.tags.labels and yy is None:
            raise UserError(f"{self.name} needs labels y")
        out = self._transform(xx, yy)
        assert out.dtype == np.uint8 and out.shape == xx.shape, (out.dtype, out.shape, xx.shape)
        return out

    def fit_purify(self, x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor | None = None) -> np.ndarray:
        return self.fit(x, y).purify(x, y)

    # --- for subclasses ----------------------------------------------------------------------
    def _fit(self, x: np.ndarray, y: np.ndarray | None) -> None:
        return None

    def _transform(self, x: np.ndarray, y: np.ndarray | None) -> np.ndarray:
        raise NotImplementedError


#: pre-training purifiers: name -> Purifier subclass (``--method NAME`` of ``unpoison purify``)
DEFENSES: Registry[type[Purifier]] = Registry("defense")
#: training-time defenses: name -> factory(**params) returning a TrainDefense callable
TRAIN_DEFENSES: Registry[Callable[..., TrainDefense]] = Registry("training-time defense")


def make_purifier(name: str, params: Mapping[str, Any] | None = None, *, device: str | torch.device = "auto",
                  seed: int = 0, progress: bool = True, preset: str | None = None,
                  checkpoint_dir: str | Path | None = None, resume: bool | None = False,
                  memory_budget: str | int | None = None, dist: Any = None, **more: Any) -> Purifier:
    """The one way to build a purifier (the CLI, the pipeline, detection, a benchmark cell and its check).

    Method parameters (``params`` and/or keywords; a ``preset`` among them wins over the ``preset`` argument) are
    checked against its ``PARAMS``; the common settings it takes (its ``COMMON``: device, seed, progress, preset)
    are passed. Its :class:`~unpoison.tags.Tags` decide the rest: ``checkpoint_dir`` is used only by a purifier
    that checkpoints, ``resume=None`` means "resume when it checkpoints" while ``resume=True`` for one that does
    not is a :class:`UserError`; so are a ``memory_budget`` and a several-process ``dist``
    (:mod:`unpoison.distributed`) for one that does not stream."""
    cls = DEFENSES.get(name)
    tags = cls.tags
    params = {**(params or {}), **more}
    preset = params.pop("preset", None) or preset
    params = check_params(params, cls.PARAMS, f"defense {name!r}")
    common = {"device": device, "seed": seed, "progress": progress, "preset": preset}
    kw = dict(params)
    kw.update({k: v for k, v in common.items() if k in cls.COMMON and v is not None})
    if preset is not None and "preset" not in cls.COMMON:
        raise UserError(f"defense {name!r} has no presets")
    if tags.checkpoint and checkpoint_dir is not None:
        kw.update(checkpoint_dir=str(checkpoint_dir), resume=True if resume is None else bool(resume))
    elif resume:
        raise UserError(f"defense {name!r} has nothing to resume (it does not checkpoint)")
    if tags.streaming:
        kw.update(memory_budget=memory_budget, **({"dist": dist} if dist is not None else {}))
    elif memory_budget is not None:
        can = ", ".join(n for n in DEFENSES.names() if DEFENSES.get(n).tags.streaming)
        raise UserError(f"defense {name!r} holds the split in memory; a memory budget applies to {can}")
    elif dist is not None and getattr(dist, "active", False):
        raise UserError(f"defense {name!r} runs in one process; drop --nproc (or torchrun)")
    try:
        return cls(**kw)
    except TypeError as e:
        raise UserError(f"bad parameters for defense {name!r}: {e}") from None


def require_packages(name: str) -> None:
    """Raise :class:`UserError` naming the pip extra when an optional package defense ``name`` requires
    (its ``tags.requires``) is not installed."""
    for module, extra in DEFENSES.get(name).tags.requires:
        if importlib.util.find_spec(module) is None:
            raise UserError(f"defense {name!r} needs the {module!r} package: pip install 'unpoison[{extra}]'")


def make_train_defense(name: str, **params: Any) -> TrainDefense:
    """Build a training-time defense from its ``PARAMS`` (unknown names are a :class:`UserError`)."""
    cls = TRAIN_DEFENSES.get(name)
    params = check_params(params, getattr(cls, "PARAMS", {}), f"training-time defense {name!r}")
    try:
        return cls(**params)
    except TypeError as e:
        raise UserError(f"bad parameters for training-time defense {name!r}: {e}") from None
