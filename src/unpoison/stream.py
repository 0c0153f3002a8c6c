"""Batches for the training loops: resident on the device, or streamed from disk within a memory budget.

Every loop that walks a dataset in batches (D-VAE training and inference, the scoring protocol)
takes its images from a :class:`BatchSource`:

* :class:`ResidentSource`: the whole split on the device as uint8 NCHW, a batch is one gather on
  the device (the fast path for sets that fit);
* :class:`StreamedSource`: the split stays on disk (an ``npy`` folder's memmap); a background thread
  reads each batch's rows in ascending file order (:class:`~unpoison.data.rows.RowReader`: one
  ``preadv`` per run of consecutive rows) into pinned host memory a few batches ahead, and the loop
  copies it to the device. Resident memory is a few batches, whatever the size of the set.

Both give the same uint8 batch for the same indices, so a loop that draws its permutation from
the same generator sees the same batches, bit for bit, either way. :func:`make_source` picks one:
resident when the split times the caller's footprint factor fits the memory budget, streamed
otherwise. The budget (:func:`memory_budget`) is ``--memory-budget`` when given, else half of the
memory free on the device that would hold the split (``MemAvailable`` for the CPU, the CUDA
allocator's free memory for a GPU), never more than ``$UNPOISON_MAX_MEMORY``.

This module sits below the attacks, the defenses and the scoring protocol: it imports only the
data layer's row I/O and the error types.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data._limits import human, parse_size
from .data.rows import NpyWriter, RowReader

#: share of the free memory the default budget allows (the rest is the model's, the OS's, other jobs')
BUDGET_FRACTION = 0.5
#: batches a streamed source reads ahead
PREFETCH = 3


# --- the budget ------------------------------------------------------------------------------------
def available_memory(device: torch.device | str = "cpu") -> int:
    """Bytes free now on ``device``: the CUDA allocator's free memory, or the kernel's ``MemAvailable``."""
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 4 << 30


def memory_budget(spec: str | int | None = None, device: torch.device | str = "cpu") -> int:
    """Bytes a split may take resident: ``spec`` (``2G``, ``512M``) when given, else
    :data:`BUDGET_FRACTION` of :func:`available_memory`, capped by ``$UNPOISON_MAX_MEMORY`` when set."""
    if spec not in (None, "", "auto"):
        return parse_size(spec, "--memory-budget")  # type: ignore[arg-type]
    budget = int(BUDGET_FRACTION * available_memory(device))
    env = os.environ.get("UNPOISON_MAX_MEMORY", "").strip()
    if env:
        budget = min(budget, parse_size(env, "UNPOISON_MAX_MEMORY"))
    return budget


def fits(nbytes: int, budget: int, factor: float = 1.0) -> bool:
    """Whether a split of ``nbytes`` (uint8) fits ``budget`` when the loop holds ``factor`` copies of it."""
    return nbytes * factor <= budget


# --- sources -----------------------------------------------------------------------------------------
def _nchw(t: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC rows -> contiguous NCHW (the layout a resident split has, so batches match bit for bit)."""
    return t.permute(0, 3, 1, 2).contiguous()


def shard_batches(order: torch.Tensor, batch_size: int, rank: int = 0, world: int = 1) -> list[torch.Tensor]:
    """Training batches: ``order`` cut into global batches of ``batch_size``, each split across ``world``
    ranks (near-equal contiguous parts; this rank's part). One rank: the batches themselves."""
    batches = list(order.split(batch_size))
    if world == 1:
        return batches
    return [b.tensor_split(world)[rank] for b in batches]


def shard_ranges(n: int, batch: int, rank: int = 0, world: int = 1) -> list[tuple[int, int]]:
    """Inference batches ``[start, stop)`` of ``batch`` rows, whole batches dealt to ranks in contiguous runs.

    Batch boundaries do not depend on ``world``, so every batch is the same tensor whatever the number of
    processes (and the output the same bytes)."""
    ranges = [(i, min(n, i + batch)) for i in range(0, n, batch)]
    if world == 1:
        return ranges
    per, extra = divmod(len(ranges), world)
    lo = rank * per + min(rank, extra)
    return ranges[lo:lo + per + (1 if rank < extra else 0)]


class BatchSource:
    """uint8 NCHW batches of an ``N x H x W x C`` image split, on ``device``, by index or by range."""

    streamed: bool = False

    def __init__(self, n: int, hwc: tuple[int, int, int], device: torch.device) -> None:
        self.n = n
        self.hwc = hwc
        self.device = device

    def __len__(self) -> int:
        return self.n

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """NCHW, as a resident tensor's."""
        h, w, c = self.hwc
        return (self.n, c, h, w)

    def take(self, idx: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def rows(self, start: int, stop: int) -> torch.Tensor:
        raise NotImplementedError

    def batches(self, index_batches: Sequence[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(idx, images)`` for each index batch, in order."""
        for idx in index_batches:
            yield idx, self.take(idx)

    def ranges(self, ranges: Sequence[tuple[int, int]]) -> Iterator[tuple[int, torch.Tensor]]:
        """``(start, images)`` for each ``[start, stop)`` range, in order."""
        for a, b in ranges:
            yield a, self.rows(a, b)

    def close(self) -> None:
        return None

    def describe(self) -> dict[str, Any]:
        h, w, c = self.hwc
        return {"streamed": self.streamed, "n": self.n, "bytes": self.n * h * w * c}


class ResidentSource(BatchSource):
    """The whole split on the device as uint8 NCHW; a batch is ``x[idx]``."""

    def __init__(self, x_u8: torch.Tensor, device: torch.device | None = None) -> None:
        dev = device or x_u8.device
        self.x = x_u8.to(dev)
        super().__init__(len(self.x), (self.x.shape[2], self.x.shape[3], self.x.shape[1]), dev)

    @classmethod
    def from_numpy(cls, x: np.ndarray, device: torch.device, chunk_bytes: int = 64 << 20) -> ResidentSource:
        """Copy uint8 NHWC ``x`` (maybe memmapped: read from its file) to ``device`` in chunks."""
        n, h, w, c = x.shape
        out = torch.empty((n, c, h, w), dtype=torch.uint8, device=device)
        step = max(1, chunk_bytes // max(1, h * w * c))
        with RowReader(x) as r:
            for i in range(0, n, step):
                out[i:i + step] = _nchw(torch.from_numpy(r.read(i, i + step)).to(device))
        return cls(out, device)

    def take(self, idx: torch.Tensor) -> torch.Tensor:
        return self.x[idx]

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return self.x[start:stop]


class StreamedSource(BatchSource):
    """The split read from disk batch by batch (see the module doc).

    Host memory is a fixed ring of ``prefetch + 2`` batch buffers (pinned on CUDA), reused batch after
    batch: allocating a fresh buffer per batch let the C allocator's caches grow the process by
    ~2 MiB a batch (measured on 128x128 images), and pinned allocations are slow."""

    streamed = True

    def __init__(self, x: np.ndarray, device: torch.device, prefetch: int = PREFETCH) -> None:
        super().__init__(len(x), tuple(x.shape[1:]), device)  # type: ignore[arg-type]
        self.reader = RowReader(x)
        self.prefetch = max(1, prefetch)
        self.pin = device.type == "cuda" and torch.cuda.is_available()

    def _host(self, n: int) -> torch.Tensor:
        h, w, c = self.hwc
        return torch.empty((n, h, w, c), dtype=torch.uint8, pin_memory=self.pin)

    def _to_device(self, host: torch.Tensor) -> torch.Tensor:
        return _nchw(host.to(self.device, non_blocking=self.pin))

    def take(self, idx: torch.Tensor) -> torch.Tensor:
        host = self._host(len(idx))
        self.reader.gather(idx.cpu().numpy(), out=host.numpy())
        return self._to_device(host)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        stop = min(stop, self.n)
        host = self._host(max(0, stop - start))
        self.reader.read(start, stop, out=host.numpy())
        return self._to_device(host)

    def _stream(self, jobs: list[tuple[int, Any]]) -> Iterator[torch.Tensor]:
        """Device batches of ``jobs`` (``(rows, fill(out))`` in order), read ahead on a thread into the ring."""
        if not jobs:
            return
        ring = [self._host(max(k for k, _ in jobs)) for _ in range(self.prefetch + 2)]
        copied: list[Any] = [None] * len(ring)  # CUDA event of each buffer's last copy to the device
        free: queue.SimpleQueue[int] = queue.SimpleQueue()
        for i in range(len(ring)):
            free.put(i)

        def job(k: int, fill: Any) -> Any:
            def run() -> tuple[int, int]:
                slot = free.get_nowait()  # never empty: <= prefetch queued + 1 filling + 1 in the consumer's hands
                if copied[slot] is not None:
                    copied[slot].synchronize()
                fill(ring[slot][:k].numpy())
                return slot, k

            return run

        with _Prefetcher([job(k, fill) for k, fill in jobs], self.prefetch) as pf:
            for slot, k in pf:
                out = self._to_device(ring[slot][:k])
                if self.pin:
                    copied[slot] = torch.cuda.Event()
                    copied[slot].record()
                free.put(slot)
                yield out

    def batches(self, index_batches: Sequence[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if not index_batches:
            return
        sizes = [len(b) for b in index_batches]
        flat = torch.cat(list(index_batches)).cpu().numpy()  # one device sync per epoch, not one per batch
        cpu = np.split(flat, np.cumsum(sizes)[:-1])
        jobs = [(len(i), lambda out, i=i: self.reader.gather(i, out=out)) for i in cpu]
        yield from zip(index_batches, self._stream(jobs))

    def ranges(self, ranges: Sequence[tuple[int, int]]) -> Iterator[tuple[int, torch.Tensor]]:
        jobs = [(b - a, lambda out, a=a, b=b: self.reader.read(a, b, out=out)) for a, b in ranges]
        yield from zip((a for a, _ in ranges), self._stream(jobs))

    def close(self) -> None:
        self.reader.close()


class _Prefetcher:
    """Runs ``jobs`` in order on one background thread, at most ``depth`` results ahead of the consumer.

    A job's exception is raised in the consumer at that job's turn; leaving early (``close``, a ``with``
    exit, an exception in the loop) stops the thread without reading further."""

    _END = object()

    def __init__(self, jobs: Sequence[Any], depth: int) -> None:
        self.jobs = jobs
        self.q: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="unpoison-prefetch", daemon=True)
        self.thread.start()

    def _put(self, item: Any) -> bool:
        while not self.stop.is_set():
            try:
                self.q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        for job in self.jobs:
            if self.stop.is_set():
                return
            try:
                item = job()
            except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
                self._put(_Failed(e))
                return
            if not self._put(item):
                return
        self._put(self._END)

    def __iter__(self) -> Iterator[Any]:
        while True:
            item = self.q.get()
            if item is self._END:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item

    def close(self) -> None:
        self.stop.set()
        self.thread.join()

    def __enter__(self) -> _Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def make_source(x: np.ndarray | torch.Tensor, device: torch.device, budget: int | None = None,
                factor: float = 1.0, stream: bool | None = None) -> BatchSource:
    """A :class:`BatchSource` for uint8 images: NHWC numpy (maybe a memmap) or NCHW tensor (already loaded).

    ``stream`` None: streamed when ``factor`` copies of the split do not fit ``budget`` (default
    :func:`memory_budget` of ``device``); True/False forces the choice. A tensor is always resident."""
    if isinstance(x, torch.Tensor):
        return ResidentSource(x, device)
    if stream is None:
        stream = not fits(int(x.nbytes), memory_budget(None, device) if budget is None else budget, factor)
    return StreamedSource(x, device) if stream else ResidentSource.from_numpy(x, device)


def plan_line(what: str, nbytes: int, budget: int, factor: float, streamed: bool, forced: bool = False) -> str:
    """One line saying which path a split takes and why (printed by commands, recorded in manifests)."""
    need = human(nbytes * factor)
    if forced:
        how = "streaming from disk" if streamed else "resident in memory"
        return f"{what}: {how} ({human(nbytes)} of images; forced)"
    if streamed:
        return (f"{what}: streaming from disk ({human(nbytes)} of images, about {need} resident would exceed the "
                f"memory budget {human(budget)})")
    return f"{what}: resident in memory ({human(nbytes)} of images, about {need} within the budget {human(budget)})"


def open_array(path: str | Path) -> np.ndarray:
    """A finished ``.npy`` memory-mapped read-only (what a streamed stage hands to the next)."""
    return np.load(path, mmap_mode="r", allow_pickle=False)


# --- sinks: where a loop's per-batch outputs go ------------------------------------------------------
class TensorSink:
    """Per-batch outputs collected in one tensor of ``n`` rows on the batches' device (the resident path)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.t: torch.Tensor | None = None

    def put(self, start: int, batch: torch.Tensor) -> None:
        if self.t is None:
            self.t = torch.empty((self.n, *batch.shape[1:]), dtype=batch.dtype, device=batch.device)
        self.t[start:start + len(batch)] = batch

    def result(self) -> torch.Tensor:
        if self.t is None:
            raise ValueError("nothing was put into this sink")
        return self.t

    def close(self) -> None:
        return None


class NpySink:
    """Per-batch NCHW outputs written as NHWC rows of a ``.npy`` (:class:`~unpoison.data.rows.NpyWriter`).

    Several ranks each open the same file and write their own disjoint rows."""

    def __init__(self, writer: NpyWriter) -> None:
        self.writer = writer

    def put(self, start: int, batch: torch.Tensor) -> None:
        self.writer.write(start, batch.permute(0, 2, 3, 1).contiguous().cpu().numpy())

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


#: where a stage's rows go: a device tensor or a ``.npy`` file
Sink = TensorSink | NpySink
