"""One exception type for everything a user can get wrong.

The CLI turns a :class:`UserError` into a single line on stderr and exit code 2; anything else is a
bug and keeps its traceback. Library callers can catch it like a ``ValueError``.
"""

from __future__ import annotations

import math
import os
import sys
import unicodedata
from collections.abc import Callable
from pathlib import Path


class UserError(ValueError):
    """Bad input from the user (a file, a flag, a config). Exit code 2, one line, no traceback."""

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = None if path is None else str(path)
        super().__init__(f"{printable(path)}: {message}" if path is not None else message)


class NonFiniteError(UserError):
    """Training or its output went NaN/inf: nothing is written (a silent garbage result is worse)."""


def check(cond: bool, message: str, path: str | Path | None = None) -> None:
    """Raise :class:`UserError` unless ``cond`` holds."""
    if not cond:
        raise UserError(message, path)


def printable(text: object) -> str:
    """``text`` safe for a terminal: control and other non-printing characters become escapes.

    A file or class name may hold ``\\x1b[...`` sequences (or a newline): printed raw they would
    rewrite the terminal or split the promised one-line error.
    """
    s = str(text)
    if s.isprintable():
        return s
    out = []
    for ch in s:
        if ch.isprintable():
            out.append(ch)
        elif unicodedata.category(ch) == "Zs":
            out.append(" ")
        else:
            out.append(ch.encode("unicode_escape").decode("ascii"))
    return "".join(out)


#: seeds are handed to numpy (< 2**32 after folding), torch (< 2**64) and derived as seed * 1000 + k
SEED_MAX = 2**32 - 1


def check_seed(seed: object, what: str = "--seed") -> int:
    """A seed in [0, 2**32 - 1]; anything else (negative, 10**20, 1.5) is a :class:`UserError`."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        try:
            as_int = int(seed)  # type: ignore[call-overload]
        except (TypeError, ValueError, OverflowError):
            raise UserError(f"{what} must be an integer in [0, {SEED_MAX}], got {printable(seed)}") from None
        if as_int != seed:
            raise UserError(f"{what} must be an integer in [0, {SEED_MAX}], got {printable(seed)}")
        seed = as_int
    if not 0 <= seed <= SEED_MAX:
        raise UserError(f"{what} must be an integer in [0, {SEED_MAX}], got {seed}")
    return int(seed)


def check_finite_loss(value: float, what: str, epoch: int, hint: str = "--lr", unit: str = "epoch") -> None:
    """Stop a run whose loss went NaN/inf (checked once an epoch on a sum the loop already synced)."""
    if not math.isfinite(value):
        raise NonFiniteError(f"{what} diverged: loss is {value} at {unit} {epoch}; nothing was written "
                             f"(a smaller {hint} may help)")


# --- the promise every entry point keeps ----------------------------------------------------------------------
def _fail(prefix: str, message: str) -> int:
    """The promised single line on stderr (escapes shown, never sent raw), exit code 2."""
    print(f"{prefix}: error: {printable(message)}", file=sys.stderr)
    return 2


def _silence_stdout() -> None:
    """After a broken pipe: point stdout at /dev/null so the interpreter's final flush stays quiet."""
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, sys.stdout.fileno())
        os.close(fd)
    except (OSError, ValueError, AttributeError):
        pass


def run_guarded(prefix: str, fn: Callable[[], int]) -> int:
    """``fn()``'s exit code, with the promise every command keeps: a UserError (and the environment's
    errors: disk, memory, a closed pipe) is one line on stderr and exit code 2; anything else is a bug and
    keeps its traceback. The command line and the purify workers run under it."""
    try:
        rc = int(fn() or 0)
        sys.stdout.flush()  # inside the try: `unpoison info X | head` fails here, not at exit
        return rc
    except UserError as e:
        return _fail(prefix, str(e))
    except BrokenPipeError:
        _silence_stdout()
        return _fail(prefix, "output closed early (broken pipe)")
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        return _fail(prefix, "out of memory (a smaller --batch-size, subset or UNPOISON_MAX_MEMORY may help)")
    except OSError as e:  # the environment (disk, permissions), not a bug: one line naming the file
        where = f"{e.filename}: " if e.filename else ""
        return _fail(prefix, f"{where}{e.strerror or e}")
    except RuntimeError as e:
        if type(e).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError (CUDA), without importing torch
            return _fail(prefix, f"out of device memory: {str(e).splitlines()[0]} (try a smaller --batch-size)")
        raise
