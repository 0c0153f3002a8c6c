"""The format interface and its registry (one entry per on-disk dataset format)."""

from __future__ import annotations

from pathlib import Path

from .._registry import Registry
from .dataset import ImageDataset


class DatasetFormat:
    """A readable (and maybe writable) on-disk layout.

    Subclasses set ``name`` and implement :meth:`detect` and :meth:`read`; writable formats also
    implement :meth:`write`, which writes into a *fresh* path (atomicity is handled by the caller).
    """

    name: str = ""
    writable: bool = True
    #: ``write`` produces a directory (True) or a single file (False)
    writes_dir: bool = True
    #: detection order (lower first): specific layouts before generic ones, so a folder that would
    #: also pass a looser detector (e.g. a CIFAR folder inside an image tree) gets the right reader
    priority: int = 50
    #: False for formats that are only chosen by ``FORMAT:PATH`` (e.g. ``imagenet`` = resized imagefolder)
    autodetect: bool = True

    def detect(self, path: Path) -> bool:
        raise NotImplementedError

    def read(self, path: Path, mmap: bool = False) -> ImageDataset:
        raise NotImplementedError

    def write(self, ds: ImageDataset, path: Path) -> None:
        raise NotImplementedError(f"format {self.name!r} cannot be written")


FORMATS: Registry[DatasetFormat] = Registry("dataset format")
