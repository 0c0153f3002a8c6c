"""One exception type for everything a user can get wrong.

The CLI turns a :class:`UserError` into a single line on stderr and exit code 2; anything else is a
bug and keeps its traceback. Library callers can catch it like a ``ValueError``.
"""

from __future__ import annotations

from pathlib import Path


class UserError(ValueError):
    """Bad input from the user (a file, a flag, a config). Exit code 2, one line, no traceback."""

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = None if path is None else str(path)
        super().__init__(f"{path}: {message}" if path is not None else message)


def check(cond: bool, message: str, path: str | Path | None = None) -> None:
    """Raise :class:`UserError` unless ``cond`` holds."""
    if not cond:
        raise UserError(message, path)
