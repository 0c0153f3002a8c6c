"""Reading (and writing) the pickles of the CIFAR "python version" without trusting them.

``pickle.load`` on a downloaded file runs whatever the file names (``os.system`` included). The
CIFAR batches only hold dicts, lists, ints, byte strings and numpy arrays, so :class:`SafeUnpickler`
resolves exactly the globals those need and refuses everything else with a :class:`UserError`.

:func:`dump_py2` writes pickles the way the original (Python 2) files are laid out: dict keys and
strings are Python-2 ``str`` opcodes, so unpickling with ``encoding="bytes"`` gives ``b"data"``
keys (the CIFAR site's snippet) and ``encoding="latin1"`` gives ``"data"`` keys (torchvision's
loader), exactly as with the originals.
"""

from __future__ import annotations

import _codecs
import builtins
import io
import pickle
import struct
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from ..errors import UserError

try:  # numpy >= 2
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _multiarray  # type: ignore[no-redef]
    from numpy.core import numeric as _numeric  # type: ignore[no-redef]

_ALLOWED: dict[tuple[str, str], Any] = {}
for _mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _ALLOWED[(_mod, "_reconstruct")] = _multiarray._reconstruct
    _ALLOWED[(_mod, "scalar")] = _multiarray.scalar
for _mod in ("numpy.core.numeric", "numpy._core.numeric"):
    _ALLOWED[(_mod, "_frombuffer")] = _numeric._frombuffer
_ALLOWED[("numpy", "ndarray")] = np.ndarray
_ALLOWED[("numpy", "dtype")] = np.dtype
# Python 3 protocol-2 pickles spell bytes as _codecs.encode(str, "latin1")
_ALLOWED[("_codecs", "encode")] = _codecs.encode
for _name in ("dict", "list", "tuple", "set", "frozenset", "bytes", "bytearray", "str", "int", "float", "bool",
              "complex"):
    _ALLOWED[("builtins", _name)] = getattr(builtins, _name)
    _ALLOWED[("__builtin__", _name)] = _ALLOWED[("builtins", _name)]


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that resolves only numpy array reconstruction and plain builtin containers."""

    def find_class(self, module: str, name: str) -> Any:
        obj = _ALLOWED.get((module, name))
        if obj is None:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} (not a plain data pickle)")
        return obj

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refusing persistent ids")


def safe_load(path: str | Path, encoding: str = "bytes") -> Any:
    """Load one pickle file with :class:`SafeUnpickler`; any problem is a one-line UserError.

    ``encoding="bytes"`` is what the Python-2 originals need (their ``str`` become ``bytes``).
    """
    try:
        with open(path, "rb") as f:
            return SafeUnpickler(f, encoding=encoding).load()
    except pickle.UnpicklingError as e:
        raise UserError(f"unsafe or corrupt pickle: {e}", path) from None
    except (EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError, struct.error,
            MemoryError, OSError) as e:
        raise UserError(f"corrupt or truncated pickle ({type(e).__name__}: {e})", path) from None


class Py2Str(bytes):
    """Bytes that are pickled as a Python-2 ``str`` (opcodes SHORT_BINSTRING / BINSTRING)."""


class _Global:
    """A module-level name written as a GLOBAL opcode with the spelling old readers resolve."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name


_RECONSTRUCT = _Global("numpy.core.multiarray", "_reconstruct")
_NDARRAY = _Global("numpy", "ndarray")
_DTYPE = _Global("numpy", "dtype")


class _Py2Pickler(pickle._Pickler):  # type: ignore[misc,name-defined]
    """The pure-Python pickler, taught Py2Str, fixed global spellings and numpy arrays as py2 did them."""

    dispatch = dict(pickle._Pickler.dispatch)  # type: ignore[attr-defined]

    def save_py2str(self, obj: Py2Str) -> None:
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + bytes(obj))
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + bytes(obj))
        self.memoize(obj)

    def save_fixed_global(self, obj: _Global) -> None:
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())

    def save_ndarray(self, arr: np.ndarray) -> None:
        """``_reconstruct(ndarray, (0,), b"b")`` then BUILD with (1, shape, dtype, False, raw bytes)."""
        if arr.dtype.hasobject:
            raise ValueError("object arrays are not written")
        arr = np.ascontiguousarray(arr)
        self.save(_RECONSTRUCT)
        self.save((_NDARRAY, (0,), Py2Str(b"b")))
        self.write(pickle.REDUCE)
        self.write(pickle.MARK)
        self.save(1)
        self.save(tuple(int(d) for d in arr.shape))
        self.save_dtype(arr.dtype)
        self.save(False)
        self.save(Py2Str(arr.tobytes()))
        self.write(pickle.TUPLE)
        self.write(pickle.BUILD)

    def save_dtype(self, dt: np.dtype) -> None:
        order = dt.str[0] if dt.itemsize > 1 else "|"
        self.save(_DTYPE)
        self.save((Py2Str(dt.str[1:].encode()), 0, 1))
        self.write(pickle.REDUCE)
        self.save((3, Py2Str(order.encode()), None, None, None, -1, -1, 0))
        self.write(pickle.BUILD)

    dispatch[Py2Str] = save_py2str
    dispatch[_Global] = save_fixed_global
    dispatch[np.ndarray] = save_ndarray


def dump_py2(obj: Any, f: BinaryIO) -> None:
    """Pickle ``obj`` (dicts/lists/ints/Py2Str/uint8 arrays) with protocol 2, laid out like the originals."""
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    f.write(buf.getvalue())
