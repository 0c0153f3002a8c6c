"""The one checkpoint store: D-VAE's stages, the surrogate attacks' rounds and AVATAR's diffusion model.

Every checkpoint is a ``torch.save`` file written atomically (a crash leaves the old file or the new one)
and read with ``torch.load(weights_only=True)`` (a file can rebuild tensors and plain containers, never run
code); a file that cannot be read, or that belongs to another run (its fingerprint differs), is a one-line
:class:`~unpoison.errors.UserError`. :class:`CheckpointStore` adds a folder of named states tagged with one
run's fingerprint (D-VAE: per-epoch training state, finished stages, stage images).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import UserError
from .outputs import atomic_path
from .stream import open_array
from .utils import write_json


def save_state(path: str | Path, state: dict[str, Any]) -> None:
    """``state`` to ``path`` atomically; a short write (full disk) is a :class:`UserError`."""
    with atomic_path(Path(path)) as tmp:
        try:
            torch.save(state, tmp)
        except RuntimeError as e:  # torch's zip writer reports a short write (full disk) this way
            raise UserError(f"could not write checkpoint (disk full?): {str(e).splitlines()[0]}", path) from None


def load_state(path: str | Path, what: str = "checkpoint", fingerprint: str | None = None,
               other_run: str = "checkpoint belongs to another configuration or dataset; refusing to resume") -> Any:
    """A state saved by :func:`save_state`, read without running code; with ``fingerprint``, a state tagged
    with another one is refused (``other_run`` says so)."""
    try:
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's problem, said in one line
        raise UserError(f"unreadable {what}: {type(e).__name__}: {str(e)[:200]}", path) from None
    if fingerprint is not None and (not isinstance(state, dict) or state.get("fingerprint") != fingerprint):
        raise UserError(other_run, path)
    return state


class CheckpointStore:
    """Named states and stage images in ``directory``, tagged with one run's fingerprint.

    A directory holding another run's files is refused on resume (and its files replaced when not
    resuming). Stage images are ``.npy`` files beside a fingerprinted marker (:meth:`saved_images`). Only the
    ``writer`` (rank 0 of a job) writes or deletes; every rank reads. ``directory=None``: nothing is kept.
    """

    #: the stage-image files this class writes (and deletes when a run starts afresh)
    IMAGES = ("stage1_images",)

    def __init__(self, directory: str | Path | None, fingerprint: str, config: dict[str, Any],
                 resume: bool, writer: bool = True) -> None:
        self.dir = Path(directory) if directory else None
        self.fingerprint = fingerprint
        self.resume = resume
        self.writer = writer
        if self.dir is None:
            if resume:
                raise UserError("resume=True needs a checkpoint_dir")
            return
        meta = self.dir / "run.json"
        if resume and meta.exists():
            try:
                old = json.loads(meta.read_text())
            except (OSError, ValueError) as e:
                raise UserError(f"unreadable checkpoint metadata: {e}", meta) from None
            if old.get("fingerprint") != fingerprint:
                why = ("another configuration" if old.get("config") != config
                       else "other input data (images or labels differ)")
                raise UserError(f"checkpoint belongs to {why}; refusing to resume (delete it or drop --resume)",
                                self.dir)
        if not writer:
            return
        if not resume and self.dir.exists():
            for pattern in ("*.epoch.pt", "*.done.pt", *(f"{n}.npy" for n in self.IMAGES)):  # only ours
                for f in self.dir.glob(pattern):
                    f.unlink()
        write_json(meta, {"fingerprint": fingerprint, "config": config})

    def _load(self, name: str) -> dict[str, Any] | None:
        if self.dir is None or not self.resume:
            return None
        path = self.dir / name
        if not path.exists():
            return None
        return load_state(path, fingerprint=self.fingerprint)

    def _save(self, name: str, state: dict[str, Any]) -> None:
        if self.dir is None or not self.writer:
            return
        save_state(self.dir / name, {"fingerprint": self.fingerprint, **state})

    def epoch_state(self, stage: str) -> dict[str, Any] | None:
        return self._load(f"{stage}.epoch.pt")

    def save_epoch(self, stage: str, state: dict[str, Any]) -> None:
        self._save(f"{stage}.epoch.pt", state)

    def stage_output(self, stage: str) -> dict[str, Any] | None:
        return self._load(f"{stage}.done.pt")

    def save_stage_output(self, stage: str, state: dict[str, Any]) -> None:
        self._save(f"{stage}.done.pt", state)
        if self.dir is not None and self.writer:
            (self.dir / f"{stage}.epoch.pt").unlink(missing_ok=True)

    def images_path(self, name: str) -> Path | None:
        return None if self.dir is None else self.dir / f"{name}.npy"

    def saved_images(self, name: str, shape: tuple[int, ...]) -> np.ndarray | None:
        """A finished stage's images (read-only memmap) when resuming this very run, else None."""
        marker, path = self.stage_output(name), self.images_path(name)
        if marker is None or path is None or not path.is_file():
            return None
        arr = open_array(path)
        if tuple(arr.shape) != tuple(shape) or arr.dtype != np.uint8:
            raise UserError(f"checkpoint images have shape {arr.shape}, expected {shape}; refusing to resume", path)
        return arr

    def mark_images(self, name: str, shape: tuple[int, ...]) -> None:
        self.save_stage_output(name, {"shape": list(shape)})
