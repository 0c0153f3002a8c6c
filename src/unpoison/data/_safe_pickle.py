"""Reading (and writing) the pickles of the CIFAR "python version" without trusting them.

``pickle.load`` on a downloaded file runs whatever the file names (``os.system`` included). The
CIFAR batches only hold dicts, lists, ints, byte strings and numpy arrays, so :class:`SafeUnpickler`
resolves exactly the globals those need and refuses everything else with a :class:`UserError`.
It is also sized: nothing in the pickle can make it allocate more than the file holds (no
``bytes(10**12)``, no ``ndarray`` of a claimed shape, no memo table sized by an index) or spend
exponential time (dict keys and set members are plain scalars, so nothing hashes a shared nested tuple).

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

from ..errors import UserError, printable
from ._limits import check_alloc

try:  # numpy >= 2
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _multiarray  # type: ignore[no-redef]
    from numpy.core import numeric as _numeric  # type: ignore[no-redef]

_BAD = pickle.UnpicklingError


class _NDArrayRef:
    """Stands for ``numpy.ndarray`` in a pickle: usable as ``_reconstruct``'s subtype, never callable, so a
    pickle cannot call ``ndarray(shape=(10**10,))``."""


def _reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    # numpy pickles call _reconstruct(ndarray, (0,), b"b") and then set the real shape and bytes (BUILD),
    # which checks them against the data in the file; a bigger shape here would allocate from a claim
    if subtype is not _NDArrayRef or dtype not in (b"b", "b") or not isinstance(shape, tuple) \
            or not all(isinstance(d, int) and 0 <= d <= 1 for d in shape):
        raise _BAD("refusing an array reconstruction that is not numpy's own (empty shape, byte dtype)")
    return _multiarray._reconstruct(np.ndarray, shape, dtype)


def _frombuffer(buf: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    if not isinstance(buf, (bytes, bytearray, memoryview, pickle.PickleBuffer)) or not isinstance(dtype, np.dtype):
        raise _BAD("refusing _frombuffer without a byte buffer and a dtype")
    return _numeric._frombuffer(buf, dtype, shape, order)


def _dtype(obj: Any, *args: Any) -> np.dtype:
    # only type codes ("u1", b"i8"): a nested list spec could build an exponentially large structured dtype
    if not isinstance(obj, (bytes, str)) or len(obj) > 16 or not all(isinstance(a, (int, bool)) for a in args):
        raise _BAD("refusing a dtype that is not a plain type code")
    return np.dtype(obj.decode("latin1") if isinstance(obj, bytes) else obj, *args)


def _encode(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise _BAD("refusing _codecs.encode other than of text to latin1/utf-8")
    return _codecs.encode(obj, encoding, errors)


def _no_sizes(kind: type) -> Any:
    """``bytes``/``bytearray`` from data, never from a count (``bytes(10**12)`` allocates a terabyte)."""

    def make(*args: Any) -> Any:
        if args and isinstance(args[0], int):
            raise _BAD(f"refusing {kind.__name__}(<count>)")
        return kind(*args)

    return make


def _scalar_only(kind: type) -> Any:
    """``str``/``int``/``float``... of a scalar only: ``str`` of a shared nested list would print exponentially."""

    def make(*args: Any) -> Any:
        if not all(isinstance(a, (str, bytes, int, float, complex, bool)) for a in args):
            raise _BAD(f"refusing {kind.__name__}() of a non-scalar")
        return kind(*args)

    return make


_SCALARS = (str, bytes, int, float, bool, type(None))


def _check_scalars(items: Any, what: str) -> None:
    # hashing a tuple hashes its items: a shared nested tuple 60 levels deep would take 2**60 steps
    for k in items:
        if not isinstance(k, _SCALARS):
            raise _BAD(f"refusing a {what} that is not a plain scalar ({type(k).__name__})")


def _set_of(kind: type) -> Any:
    def make(*args: Any) -> Any:
        if args:
            if not isinstance(args[0], (list, tuple)):
                raise _BAD(f"refusing {kind.__name__}() of a {type(args[0]).__name__}")
            _check_scalars(args[0], "set member")
        return kind(*args)

    return make


def _dict(*args: Any) -> dict[Any, Any]:
    if args and not isinstance(args[0], dict):
        raise _BAD("refusing dict() of anything but a dict")
    return dict(*args)


_ALLOWED: dict[tuple[str, str], Any] = {}
for _mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _ALLOWED[(_mod, "_reconstruct")] = _reconstruct
    _ALLOWED[(_mod, "scalar")] = _multiarray.scalar
for _mod in ("numpy.core.numeric", "numpy._core.numeric"):
    _ALLOWED[(_mod, "_frombuffer")] = _frombuffer
_ALLOWED[("numpy", "ndarray")] = _NDArrayRef
_ALLOWED[("numpy", "dtype")] = _dtype
# Python 3 protocol-2 pickles spell bytes as _codecs.encode(str, "latin1")
_ALLOWED[("_codecs", "encode")] = _encode
for _name in ("list", "tuple"):
    _ALLOWED[("builtins", _name)] = getattr(builtins, _name)
_ALLOWED[("builtins", "dict")] = _dict
_ALLOWED[("builtins", "set")] = _set_of(set)
_ALLOWED[("builtins", "frozenset")] = _set_of(frozenset)
for _name in ("bytes", "bytearray"):
    _ALLOWED[("builtins", _name)] = _no_sizes(getattr(builtins, _name))
for _name in ("str", "int", "float", "bool", "complex"):
    _ALLOWED[("builtins", _name)] = _scalar_only(getattr(builtins, _name))
for _name in list(k[1] for k in _ALLOWED if k[0] == "builtins"):
    _ALLOWED[("__builtin__", _name)] = _ALLOWED[("builtins", _name)]

#: a pickle larger than this is not a CIFAR batch (each is ~31 MB); also capped by the memory budget
MAX_PICKLE = 1 << 30


class SafeUnpickler(pickle._Unpickler):  # type: ignore[misc,name-defined]
    """The pure-Python unpickler, resolving only numpy array reconstruction and plain builtin containers.

    Pure Python on purpose: the C unpickler sizes its memo table from the pickle's own indices, so
    ``LONG_BINPUT 2**30`` (a 10-byte file) would make it allocate and clear 16 GB; here the memo is a dict.
    """

    def find_class(self, module: str, name: str) -> Any:
        obj = _ALLOWED.get((module, name))
        if obj is None:
            raise _BAD(f"refusing to load {module}.{name} (not a plain data pickle)")
        return obj

    def persistent_load(self, pid: Any) -> Any:
        raise _BAD("refusing persistent ids")

    # --- opcodes that hash or set state: only plain scalars as keys, only numpy objects get state.
    # (After a MARK the pure-Python unpickler starts a fresh ``self.stack``: it holds exactly the marked items.)
    dispatch = dict(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]

    def load_setitem(self) -> None:
        _check_scalars([self.stack[-2]], "dict key")
        super().load_setitem()

    def load_setitems(self) -> None:
        _check_scalars(self.stack[::2], "dict key")
        super().load_setitems()

    def load_dict(self) -> None:
        _check_scalars(self.stack[::2], "dict key")
        super().load_dict()

    def load_additems(self) -> None:
        _check_scalars(self.stack, "set member")
        super().load_additems()

    def load_frozenset(self) -> None:
        _check_scalars(self.stack, "set member")
        super().load_frozenset()

    def load_build(self) -> None:
        state, inst = self.stack[-1], self.stack[-2]
        if isinstance(inst, np.dtype):
            if not (isinstance(state, tuple) and len(state) >= 4 and state[2] is None and state[3] is None):
                raise _BAD("refusing a structured dtype")
        elif not isinstance(inst, np.ndarray):
            raise _BAD(f"refusing to set the state of a {type(inst).__name__}")
        super().load_build()

    for _op, _fn in ((pickle.SETITEM, load_setitem), (pickle.SETITEMS, load_setitems), (pickle.DICT, load_dict),
                     (pickle.ADDITEMS, load_additems), (pickle.FROZENSET, load_frozenset),
                     (pickle.BUILD, load_build)):
        dispatch[_op[0]] = _fn
    del _op, _fn


def safe_load(path: str | Path, encoding: str = "bytes") -> Any:
    """Load one pickle file with :class:`SafeUnpickler`; any problem is a one-line UserError.

    The file is read whole first (its size checked against the budget), so a length claimed inside
    the pickle can never make a read allocate more than the file holds. ``encoding="bytes"`` is what
    the Python-2 originals need (their ``str`` become ``bytes``).
    """
    try:
        size = Path(path).stat().st_size
        if size > MAX_PICKLE:
            raise UserError(f"pickle is {size >> 20} MiB; a dataset batch is far smaller", path)
        check_alloc(size, "the pickle", path)
        with open(path, "rb") as f:
            data = f.read()
        return SafeUnpickler(io.BytesIO(data), encoding=encoding).load()
    except UserError:
        raise
    except pickle.UnpicklingError as e:
        raise UserError(f"unsafe or corrupt pickle: {printable(e)}", path) from None
    except (EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError, struct.error,
            MemoryError, OSError, OverflowError, RecursionError, UnicodeDecodeError) as e:
        raise UserError(f"corrupt or truncated pickle ({type(e).__name__}: {printable(e)})", path) from None


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
