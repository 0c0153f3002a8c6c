"""Where each stage's images go: device tensors (resident), or ``.npy`` files written by rows (streamed,
or several processes writing disjoint rows of the same files).

A :class:`Staging` belongs to one purifier. Its work folder is ``checkpoint_dir``, else ``scratch_dir``, else
a temporary folder of rank 0's (shared with the other ranks by its path) removed by :meth:`Staging.close`.
A file appears atomically, put in place by rank 0 once every rank has written its rows.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...data.rows import NpyWriter
from ...distributed import DistContext
from ...errors import UserError
from ...outputs import atomic_path
from ...stream import NpySink, Sink, TensorSink, open_array


class Staging:
    """The sinks a stage writes into and the arrays they become (see module doc)."""

    def __init__(self, dist: DistContext, checkpoint_dir: str | Path | None, scratch_dir: str | Path | None,
                 outputs: tuple[str, ...]) -> None:
        self.dist = dist
        self.base = checkpoint_dir or scratch_dir
        #: files :meth:`close` removes from a kept folder (a temporary folder goes whole)
        self.outputs = outputs
        self._tmp: Path | None = None
        self._work: Path | None = None

    def work_dir(self) -> Path:
        """The folder stage files are written to. The first call is collective (rank 0 makes the folder,
        every rank waits for it); later calls return the same path without communicating."""
        if self._work is not None:
            return self._work
        if self.base:
            if self.dist.main:
                Path(self.base).mkdir(parents=True, exist_ok=True)
            self.dist.barrier()
            self._work = Path(self.base)
        else:
            made = tempfile.mkdtemp(prefix="unpoison-dvae-") if self.dist.main else None
            self._work = self._tmp = Path(self.dist.broadcast_object(made))
        return self._work

    def close(self) -> None:
        """Remove what was written (the temporary folder, or the output files in a kept folder)."""
        if self.dist.main:
            if self._tmp is not None:
                shutil.rmtree(self._tmp, ignore_errors=True)
            elif self.base:
                for name in self.outputs:
                    (Path(self.base) / f"{name}.npy").unlink(missing_ok=True)
        self._tmp = self._work = None

    @contextlib.contextmanager
    def npy_output(self, path: Path, shape: tuple[int, ...], dtype: Any) -> Iterator[NpySink]:
        """A sink every rank writes its rows into; ``path`` appears (atomically, by rank 0) once all are done."""
        ctx = self.dist
        if not ctx.main:
            made = ctx.broadcast_object(None)
            if made is None:
                raise UserError("rank 0 could not create the stage output; see its message", path)
            sink = NpySink(NpyWriter.open(made))
            try:
                yield sink
            finally:
                sink.close()
            ctx.barrier()  # rows of every rank written and flushed
            ctx.barrier()  # rank 0 has put the file in place
            return
        with atomic_path(path) as tmp:
            try:
                NpyWriter.create(tmp, shape, dtype).close()
            except OSError:
                ctx.broadcast_object(None)
                raise
            ctx.broadcast_object(str(tmp))
            sink = NpySink(NpyWriter.open(tmp))
            try:
                yield sink
            finally:
                sink.close()
            ctx.barrier()
        ctx.barrier()

    @contextlib.contextmanager
    def outputs_for(self, specs: dict[str, Any], shape: tuple[int, ...], files: bool) -> Iterator[dict[str, Sink]]:
        """One sink per name: device tensors (resident), or ``.npy`` files in :meth:`work_dir` (``files``)."""
        with contextlib.ExitStack() as stack:
            if files:
                d = self.work_dir()
                yield {k: stack.enter_context(self.npy_output(d / f"{k}.npy", shape, dt)) for k, dt in specs.items()}
            else:
                yield {k: TensorSink(shape[0]) for k in specs}

    def result(self, sink: Sink, name: str) -> np.ndarray | torch.Tensor:
        """A finished output: the device tensor (resident) or the file's read-only memmap (streamed)."""
        if isinstance(sink, TensorSink):
            return sink.result()
        return open_array(self.work_dir() / f"{name}.npy")

    def discard(self, name: str, files: bool) -> None:
        """Remove a streamed intermediate (x1, x2) once no rank reads it: disk holds fewer copies of the set."""
        if files and self.dist.main and self._work is not None:
            (self._work / f"{name}.npy").unlink(missing_ok=True)

    def path(self, name: str) -> Path:
        return self.work_dir() / f"{name}.npy"
