"""Image folders: ``ROOT/train/<class>/*.png|jpg``, optional ``ROOT/test/<class>/...`` (or ``val``).

Rules (so the same folder always gives the same arrays):

* class names are the sub-folder names, sorted; the test split must have exactly the train classes;
* images are ordered by file name across classes (class as tie-break); the writer names files by
  their index, so a written dataset reads back in the same order, bit-exact (PNG is lossless);
* all grayscale (modes L, 1, I, LA...) -> C=1; otherwise everything is converted to RGB (C=3), so
  a mixed folder becomes RGB (gray images replicated), never a silent mix;
* every image must have the size of the first one (use ``imagenet:PATH`` to resize);
* a corrupt or truncated file, or a training class folder without images, is a UserError naming it
  (a test class may be empty: small test subsets lack classes).

Class names that are not safe folder names (``T-shirt/top``) or not in sorted order are written
with an index prefix, and ``classes.json`` maps the folders back to the original names.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from ...errors import UserError
from .._format import FORMATS, DatasetFormat
from .._limits import check_alloc, check_compressed
from ..dataset import ImageDataset

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}
TEST_DIRS = ("test", "val")
_BAD_IMAGE = (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError)


def _visible(p: Path) -> bool:
    return not p.name.startswith(".")


def class_dirs(split: Path) -> list[Path]:
    return sorted((d for d in split.iterdir() if d.is_dir() and _visible(d)), key=lambda d: d.name)


def image_files(d: Path) -> list[Path]:
    return sorted(f for f in d.iterdir() if f.is_file() and _visible(f) and f.suffix.lower() in IMAGE_EXTS)


def _has_class_tree(split: Path) -> bool:
    if not split.is_dir():
        return False
    return any(image_files(d) for d in class_dirs(split)[:3])


def _list_split(split: Path, allow_empty: bool = False) -> tuple[list[str], list[tuple[Path, int]]]:
    """Class names and (file, label) pairs; an empty class folder is an error in the training split."""
    dirs = class_dirs(split)
    if not dirs:
        raise UserError("no class folders (expected <split>/<class>/<image files>)", split)
    items: list[tuple[str, int, Path]] = []
    for k, d in enumerate(dirs):
        files = image_files(d)
        if not files and not allow_empty:
            raise UserError(f"class folder has no images ({', '.join(sorted(IMAGE_EXTS))})", d)
        items += [(f.name, k, f) for f in files]
    items.sort(key=lambda t: (t[0], t[1]))
    return [d.name for d in dirs], [(f, k) for _, k, f in items]


def _header(path: Path) -> tuple[str, tuple[int, int]]:
    try:
        with Image.open(path) as im:
            return im.mode, im.size
    except _BAD_IMAGE as e:
        raise UserError(f"not a readable image ({type(e).__name__}: {e})", path) from None


def _decode(path: Path, mode: str, prepare: Callable[[Image.Image], Image.Image] | None) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im.load()  # decodes fully: a truncated file fails here
            im = im.convert(mode)
            if prepare is not None:
                im = prepare(im)
            return np.asarray(im, dtype=np.uint8)
    except _BAD_IMAGE as e:
        raise UserError(f"corrupt or truncated image ({type(e).__name__}: {e})", path) from None


def _read_split(items: list[tuple[Path, int]], mode: str, size: tuple[int, int] | None,
                prepare: Callable[[Image.Image], Image.Image] | None, desc: str) -> tuple[np.ndarray, np.ndarray]:
    """Decode into one preallocated array; ``size`` None means 'every image as the first one'."""
    c = 1 if mode == "L" else 3
    if size is None:
        size = _header(items[0][0])[1]
    w, h = size
    _check_prealloc(items, h * w * c, size, desc, resized=prepare is not None)
    x = np.empty((len(items), h, w, c), dtype=np.uint8)
    y = np.empty(len(items), dtype=np.int64)
    first = items[0][0]
    for i, (f, k) in enumerate(tqdm(items, desc=desc, disable=len(items) < 2000, leave=False)):
        a = _decode(f, mode, prepare)
        if a.shape[:2] != (h, w):
            raise UserError(f"image is {a.shape[1]}x{a.shape[0]} but {first.name} is {w}x{h}; all images must "
                            "have one size (imagenet:PATH resizes to 224)", f)
        x[i] = a.reshape(h, w, c)
        y[i] = k
    return x, y


def _check_prealloc(items: list[tuple[Path, int]], per_image: int, size: tuple[int, int], desc: str,
                    resized: bool) -> None:
    """Before allocating N images of the first image's size: the folder's bytes must be able to hold them.

    A 100-byte PNG can claim 9000 x 9000 pixels; N such files would otherwise preallocate N x 243 MB.
    Compressed images cannot exceed deflate's ratio, so the total claimed must fit ``MAX_RATIO`` times
    the files' total size (unless images are resized to a fixed size), and the memory budget.
    """
    need = per_image * len(items)
    first = items[0][0]
    try:
        first_size = first.stat().st_size
        total = sum(f.stat().st_size for f, _ in items)
    except OSError as e:
        raise UserError(f"cannot read ({e.strerror or e})", e.filename or first) from None
    w, h = size
    if not resized:
        check_compressed(per_image, first_size, f"image header ({w}x{h})", first)
        check_compressed(need, total, f"{len(items)} images of {w}x{h} ({desc})", first.parent.parent)
    check_alloc(need, f"{len(items)} images of {w}x{h}", first.parent.parent)


def _mode_for(items: list[tuple[Path, int]]) -> str:
    modes = {_header(f)[0] for f, _ in items}
    return "L" if modes <= GRAY_MODES else "RGB"


def _folder_names(root: Path, dirs: list[str]) -> list[str]:
    cj = root / "classes.json"
    if not cj.is_file():
        return dirs
    try:
        if cj.stat().st_size > 16 << 20:
            raise UserError("classes.json is larger than 16 MiB; not a class-name map", cj)
        raw = json.loads(cj.read_text(encoding="utf-8"))
        folders, names = raw["folders"], raw["names"]
    except UserError:
        raise
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError, OSError) as e:
        raise UserError(f"expected {{'folders': [...], 'names': [...]}} ({type(e).__name__}: {e})", cj) from None
    if folders == dirs and isinstance(names, list) and len(names) == len(dirs):
        return [str(n) for n in names]
    return dirs


def read_image_folder(path: Path, fmt: str, force_rgb: bool = False, size: tuple[int, int] | None = None,
                      prepare: Callable[[Image.Image], Image.Image] | None = None) -> ImageDataset:
    """Shared reader of ``imagefolder`` and ``imagenet`` (which passes ``size`` and a resize ``prepare``)."""
    train = path / "train"
    if not train.is_dir():
        raise UserError("missing train/ folder (expected ROOT/train/<class>/<images>)", path)
    dirs, tr_items = _list_split(train)
    test = next((path / t for t in TEST_DIRS if (path / t).is_dir()), None)
    te_items: list[tuple[Path, int]] = []
    if test is not None:
        te_dirs, te_items = _list_split(test, allow_empty=True)
        if te_dirs != dirs:
            missing, extra = sorted(set(dirs) - set(te_dirs)), sorted(set(te_dirs) - set(dirs))
            raise UserError(f"test classes differ from train classes (missing: {missing[:5]}, extra: {extra[:5]})",
                            test)
    mode = "RGB" if force_rgb else _mode_for(tr_items + te_items)
    x_tr, y_tr = _read_split(tr_items, mode, size, prepare, "read train")
    x_te = y_te = None
    if te_items:
        x_te, y_te = _read_split(te_items, mode, (x_tr.shape[2], x_tr.shape[1]), prepare, "read test")
    return ImageDataset(x_tr, y_tr, x_te, y_te, _folder_names(path, dirs), source=str(path), format=fmt)


def _safe_folder(name: str, i: int) -> str:
    s = re.sub(r"[^\w.\-+ ]", "_", name).strip(" .")
    return s or f"class{i}"


def folder_names(classes: list[str]) -> list[str]:
    """Folder per class: the name itself when safe, unique and sorted; else index-prefixed."""
    safe = [_safe_folder(c, i) for i, c in enumerate(classes)]
    if safe == classes and len(set(safe)) == len(safe) and safe == sorted(safe):
        return safe
    w = len(str(max(len(classes) - 1, 0)))
    return [f"{i:0{w}d}_{s}" for i, s in enumerate(safe)]


def write_image_folder(ds: ImageDataset, path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    folders = folder_names(ds.classes)
    mode = "L" if ds.image_shape[2] == 1 else "RGB"
    w = max(6, len(str(len(ds.x_train))))
    for split, x, y in (("train", ds.x_train, ds.y_train), ("test", ds.x_test, ds.y_test)):
        if x is None or y is None:
            continue
        for f in folders:
            (path / split / f).mkdir(parents=True, exist_ok=True)
        for i in tqdm(range(len(x)), desc=f"write {split}", disable=len(x) < 2000, leave=False):
            img = np.asarray(x[i])
            Image.fromarray(img[..., 0] if mode == "L" else img).save(
                path / split / folders[int(y[i])] / f"{i:0{w}d}.png", compress_level=1)
    if folders != ds.classes:
        (path / "classes.json").write_text(json.dumps({"folders": folders, "names": ds.classes}, indent=1) + "\n")


class ImageFolderFormat(DatasetFormat):
    name = "imagefolder"
    priority = 40  # generic: after the formats with specific file names

    def detect(self, path: Path) -> bool:
        return path.is_dir() and _has_class_tree(path / "train")

    def read(self, path: Path, mmap: bool = False) -> ImageDataset:
        return read_image_folder(path, self.name)

    def write(self, ds: ImageDataset, path: Path) -> None:
        write_image_folder(ds, path)


FORMATS.register("imagefolder", "ROOT/train/<class>/*.png|jpg (+ test/); lossless PNG writer")(ImageFolderFormat())
