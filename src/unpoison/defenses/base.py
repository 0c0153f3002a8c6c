"""The purifier interface (scikit-learn's shape) and the defense registries.

A *purifier* is a pre-training defense: configured in ``__init__``, learned by :meth:`fit` (a no-op
for fixed transforms such as JPEG), applied by :meth:`transform` (alias :meth:`purify`). Inputs and
outputs are uint8 ``N x H x W x C`` numpy arrays (torch tensors are accepted and converted).

A *training-time defense* (adversarial training, UEraser) is a callable ``(model, x, y) -> x'``
that the scoring protocol applies to every batch (see :data:`unpoison.train.TrainDefense`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .._registry import Registry
from .._validate import as_labels, as_uint8_nhwc  # noqa: F401  (re-exported)
from ..errors import UserError
from ..train import TrainDefense


class Purifier:
    """Base class. Subclasses implement ``_transform`` (and ``_fit`` when they learn something).

    After :meth:`transform`, ``stages_`` holds named intermediate batches (for the image grid, e.g.
    ``{"after stage 1": x1}``), ``extras_`` holds arrays worth saving (e.g. ``{"p_hat": ...}``)
    and ``info_`` a JSON-able dict (per-stage PSNR, losses). ``needs_labels`` says whether
    :meth:`fit`/:meth:`transform` use ``y``. Purifiers with ``supports_checkpoint`` accept
    ``checkpoint_dir`` and ``resume`` in ``__init__``.
    """

    name: str = ""
    #: method parameters exposed as CLI flags: name -> (type, default, help)
    PARAMS: dict[str, tuple[type, Any, str]] = {}
    #: which of the CLI's common settings (device, seed, progress) ``__init__`` accepts
    COMMON: frozenset[str] = frozenset()
    needs_labels: bool = False
    learns: bool = False
    supports_checkpoint: bool = False
    #: accepts ``memory_budget`` and ``dist``: streams splits larger than memory, runs on several processes
    supports_streaming: bool = False

    def __init__(self, **params: Any) -> None:
        self.params = params
        self.stages_: dict[str, np.ndarray] = {}
        self.extras_: dict[str, np.ndarray] = {}
        self.info_: dict[str, Any] = {}

    def get_params(self) -> dict[str, Any]:
        return dict(self.params)

    def fit(self, x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor | None = None) -> Purifier:
        xx = as_uint8_nhwc(x)
        yy = as_labels(y, len(xx))
        if self.needs_labels and yy is None:
            raise UserError(f"{self.name} needs labels y")
        self._fit(xx, yy)
        return self

    def transform(self, x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor | None = None) -> np.ndarray:
        xx = as_uint8_nhwc(x)
        yy = as_labels(y, len(xx))
        if self.needs_labels and yy is None:
            raise UserError(f"{self.name} needs labels y")
        out = self._transform(xx, yy)
        assert out.dtype == np.uint8 and out.shape == xx.shape, (out.dtype, out.shape, xx.shape)
        return out

    purify = transform

    def fit_purify(self, x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor | None = None) -> np.ndarray:
        return self.fit(x, y).transform(x, y)

    fit_transform = fit_purify

    # --- for subclasses ----------------------------------------------------------------------
    def _fit(self, x: np.ndarray, y: np.ndarray | None) -> None:
        return None

    def _transform(self, x: np.ndarray, y: np.ndarray | None) -> np.ndarray:
        raise NotImplementedError


#: pre-training purifiers: name -> Purifier subclass (``--method NAME`` of ``unpoison purify``)
DEFENSES: Registry[type[Purifier]] = Registry("defense")
#: training-time defenses: name -> factory(**params) returning a TrainDefense callable
TRAIN_DEFENSES: Registry[Callable[..., TrainDefense]] = Registry("training-time defense")


def make_purifier(name: str, **params: Any) -> Purifier:
    cls = DEFENSES.get(name)
    try:
        return cls(**params)
    except TypeError as e:
        raise UserError(f"bad parameters for defense {name!r}: {e}") from None


def make_train_defense(name: str, **params: Any) -> TrainDefense:
    fn = TRAIN_DEFENSES.get(name)
    try:
        return fn(**params)
    except TypeError as e:
        raise UserError(f"bad parameters for training-time defense {name!r}: {e}") from None
