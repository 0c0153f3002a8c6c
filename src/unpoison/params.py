"""Parameters declared once: :class:`Param` (type, default, range, help) for every extension point.

An attack, a purifier, a training-time defense or a benchmark kind declares its parameters as a
``PARAMS`` mapping ``name -> Param``. From that one table come the command-line flags (``unpoison purify
--method NAME --help``), the values the API accepts (:func:`check_params`: unknown names, types, ranges),
the benchmark's check (which builds every object a cell will build) and ``unpoison list``.

Also here, because every family needs them and none owns them: the one bool parser (:func:`parse_bool`)
and the one "unknown X; known: ..." message (:func:`unknown`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import UserError

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def parse_bool(v: Any, what: str = "value") -> bool:
    """``v`` as a bool; text must be one of 1/0, true/false, yes/no, on/off (``"false"`` is never truthy)."""
    if isinstance(v, bool):
        return v
    if isinstance(v, str):
        low = v.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise UserError(f"{what} must be true or false, got {v!r}")
    if isinstance(v, (int, float)) and v in (0, 1):
        return bool(v)
    raise UserError(f"{what} must be true or false, got {v!r}")


def unknown(family: str, name: object, known: Iterable[str], extra: str = "") -> UserError:
    """The one message for a name that is not one of ``known``: ``unknown attack 'x'; known: a, b``."""
    listed = ", ".join(known) or "none"
    return UserError(f"unknown {family} {name!r}; known: {listed}{extra}")


@dataclass(frozen=True)
class Param:
    """One parameter: its type, default, allowed range or choices, and the help line ``--help`` shows.

    ``low`` / ``high`` bound numbers (inclusive; ``low_open`` makes the lower bound strict: ``> 0``);
    floats must be finite. ``default=None`` means "the owner's own" (a preset's value, or off)."""

    type: type
    default: Any = None
    help: str = ""
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    choices: tuple[str, ...] | None = None

    def range_text(self) -> str:
        """``[1, 4096]``, ``> 0``, ``>= 0``, ``one of a, b`` or ``""``."""
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if self.low is not None and self.high is not None and not self.low_open:
            return f"in [{_show(self.low)}, {_show(self.high)}]"
        if self.low is not None and self.high is not None:
            return f"in ({_show(self.low)}, {_show(self.high)}]"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {_show(self.low)}"
        if self.high is not None:
            return f"<= {_show(self.high)}"
        return ""

    def coerce(self, v: Any, name: str, owner: str) -> Any:
        """``v`` converted to :attr:`type` and checked against the range; a :class:`UserError` naming
        ``owner`` and ``name`` otherwise. ``None`` passes through (the owner's default)."""
        if v is None:
            return None
        what = f"{owner} {name}".strip()
        if self.type is bool:
            return parse_bool(v, what)
        if self.type in (int, float, str):
            try:
                if self.type is int and isinstance(v, float) and v != int(v):
                    raise ValueError
                if self.type is int and isinstance(v, str):
                    v = v.strip()
                out = self.type(v)
            except (TypeError, ValueError, OverflowError):
                raise UserError(f"{what} must be a{'n' if self.type is int else ''} {self.type.__name__}, "
                                f"got {v!r}") from None
        else:  # list, dict: structured values (bench kinds), checked by type only
            if not isinstance(v, self.type):
                raise UserError(f"{what} must be a {self.type.__name__}, got {v!r}")
            return v
        if isinstance(out, float) and not math.isfinite(out):
            raise UserError(f"{what} must be a finite number, got {out}")
        if self.choices is not None and out not in self.choices:
            raise UserError(f"{what} must be one of {', '.join(self.choices)}, got {out!r}")
        if isinstance(out, (int, float)):
            lo_bad = self.low is not None and (out <= self.low if self.low_open else out < self.low)
            hi_bad = self.high is not None and out > self.high
            if lo_bad or hi_bad:
                raise UserError(f"{what} must be {self.range_text()}, got {out}")
        return out


def _show(v: float) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


Params = Mapping[str, Param]


def check_params(params: Mapping[str, Any], table: Params, owner: str) -> dict[str, Any]:
    """``params`` checked against ``table`` (``owner``: how messages name it, ``defense 'jpeg'``): an unknown
    name, a bad type or a value out of range is a :class:`UserError`; returns the converted values
    (``None`` kept: "the owner's default")."""
    bad = sorted(set(params) - set(table))
    if bad:
        raise UserError(f"{owner} has no parameter(s) {', '.join(bad)}; known: {', '.join(sorted(table)) or 'none'}")
    return {k: table[k].coerce(v, k, owner) for k, v in params.items()}


def defaults(table: Params) -> dict[str, Any]:
    """Every parameter's declared default."""
    return {k: p.default for k, p in table.items()}
