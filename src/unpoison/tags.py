"""What a defense can do, declared once per class (scikit-learn's estimator tags): the builders, the pipeline,
detection, the training loop and the benchmark's check read a class's :class:`Tags`, never ``hasattr`` or a name.

A leaf module (no imports from the package), so the training loop can read a training-time defense's tags
without importing the defenses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class Tags:
    """A defense's capabilities.

    Purifiers: ``labels`` (fit/transform need y); ``learns`` (fit learns something, else it is a no-op);
    ``checkpoint`` (accepts ``checkpoint_dir`` and ``resume``); ``streaming`` (accepts ``memory_budget`` and
    ``dist``: splits larger than memory, several processes; has ``plan(x)``); ``p_hat``, how it exposes the
    disentangled poison (``none``; ``extras``: ``fit_purify`` leaves ``extras_["p_hat"]``; ``infer``:
    ``fit_stage1``, then ``estimate_perturbation`` on any images, new ones too); ``requires``, the optional
    packages it imports as (import name, pip extra) pairs. Training-time defenses: ``schedule`` (the loop calls
    ``begin(total_steps)`` before its first step)."""

    labels: bool = False
    learns: bool = False
    checkpoint: bool = False
    streaming: bool = False
    p_hat: Literal["none", "extras", "infer"] = "none"
    requires: tuple[tuple[str, str], ...] = ()
    schedule: bool = False


def tags_of(obj: Any) -> Tags:
    """The tags of a defense class or instance; a plain callable (a user's training-time defense) has none set."""
    t = getattr(obj, "tags", None)
    return t if isinstance(t, Tags) else Tags()
