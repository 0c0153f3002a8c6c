"""``icons``: a real RGB benchmark set built from Debian's PNG icon themes (no CIFAR download needed).

Why: every default was measured on grey Fashion-MNIST; colour images written by others, which this
machine can fetch (Debian packages), give a second domain. See ``docs/datasets.md`` for provenance.

Pipeline (deterministic for a given package tree and seed):

1. **scan**: every regular ``*.png`` (symlinks skipped: they are aliases of a file counted once)
   under ``usr/share/icons/<theme>/`` whose path holds one of the freedesktop category folders in
   :data:`CLASS_FOLDERS` gets that class; the icon *item* is (theme, class, file stem).
2. **variants**: an item exists at several sizes; sources smaller than 32 px are dropped, and of
   the rest at most :data:`MAX_VARIANTS` are kept (the smallest, the largest and the one nearest
   their geometric mean), so one icon does not fill a class with near-copies.
3. **convert**: RGBA composited on a fixed mid-grey background (:data:`BACKGROUND`, so additive
   perturbations are not clipped on a white field), padded to a square, resized to 32x32 with
   Lanczos, uint8 RGB.
4. **dedupe**: identical 32x32 results are kept once; one shared by two classes is dropped.
5. **split**: groups are (class, lower-case stem) across themes, so the same icon name drawn by
   several themes (GNOME and its fork MATE, for one) and all its sizes stay in one split; whole
   groups are drawn per class in seeded order and go to test while they fit in ``test_fraction`` of
   it; same-class images closer than :data:`NEAR_RMS` join their groups, and near-identical images of
   two classes are dropped.
   Classes above ``cap`` images lose whole groups, drawn with the seed.

The converter reads untrusted files: images are size-checked from their headers before decoding
(:data:`MAX_SIDE`, :data:`MAX_FILE_BYTES`; larger ones are skipped and counted), a corrupt one is
a :class:`UserError` naming it (exit 2 from the command line).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from ..errors import UserError, check_seed, printable
from ._format import FORMATS
from .dataset import ImageDataset

#: the Debian packages the set is built from (PNG themes; SVG-only themes need a rasteriser we avoid)
PACKAGES = ("oxygen-icon-theme", "gnome-icon-theme", "mate-icon-theme", "faenza-icon-theme",
            "elementary-xfce-icon-theme", "lxde-icon-theme", "tango-icon-theme", "moka-icon-theme")
#: class name -> folder names that mean it in the themes (elementary-xfce says ``mimes``)
CLASS_FOLDERS: dict[str, tuple[str, ...]] = {
    "actions": ("actions",), "apps": ("apps", "applications"), "devices": ("devices",),
    "mimetypes": ("mimetypes", "mimes"), "places": ("places",), "status": ("status",)}
CLASSES = tuple(sorted(CLASS_FOLDERS))
SIZE = 32
MIN_SOURCE = 32
MAX_VARIANTS = 3
#: mid-grey: the background transparent pixels are composited on
BACKGROUND = (128, 128, 128)
#: RMS difference (0-255) below which two images count as near-copies (same split, see ``merge_near``)
NEAR_RMS = 10.0
#: RMS below which two images count as one drawing copied (across theme families, or across classes)
COPY_RMS = 4.0
#: themes that share drawings: Tango's are the base of GNOME 2/3's, MATE forked GNOME 2, Menta recolours MATE
THEME_FAMILIES = {"Tango": "tango", "gnome": "tango", "mate": "tango", "menta": "tango"}
MAX_SIDE = 1024
MAX_FILE_BYTES = 8 << 20
MAX_IMAGES = 100_000
NAME = "icons"
FILE_NAME = "icons.npz"


@dataclass(frozen=True)
class Entry:
    """One source PNG: where it is, what it shows and how big it is."""

    path: Path
    theme: str
    label: str
    stem: str
    side: int


def _class_of(parts: Sequence[str]) -> str | None:
    for part in parts:
        for label, folders in CLASS_FOLDERS.items():
            if part in folders:
                return label
    return None


def _theme_of(path: Path, root: Path) -> tuple[str, tuple[str, ...]]:
    """(theme, folders inside the theme) of ``path``: the folder after ``icons`` or else the first one."""
    parts = path.relative_to(root).parts[:-1]
    if "icons" in parts:
        i = parts.index("icons")
        if i + 1 < len(parts):
            return parts[i + 1], parts[i + 2:]
    return (parts[0] if parts else "."), parts[1:]


def _header(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise UserError(f"not a readable image ({type(e).__name__}: {printable(e)})", path) from None


def scan(roots: Iterable[str | Path]) -> tuple[list[Entry], Counter[str]]:
    """Every usable PNG under ``roots`` (sorted by path) and counts of what was skipped and why."""
    entries: list[Entry] = []
    skipped: Counter[str] = Counter()
    for root in map(Path, roots):
        if not root.is_dir():
            raise UserError("icon source folder not found", root)
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for fn in sorted(filenames):
                if not fn.lower().endswith(".png"):
                    continue
                p = Path(dirpath) / fn
                if p.is_symlink():
                    skipped["symlink"] += 1
                    continue
                theme, inner = _theme_of(p, root)
                label = _class_of(inner)
                if label is None:
                    skipped["other folder"] += 1
                    continue
                try:
                    nbytes = p.stat().st_size
                except OSError as e:
                    raise UserError(f"cannot read ({e.strerror or e})", p) from None
                if nbytes > MAX_FILE_BYTES:
                    skipped["file too large"] += 1
                    continue
                w, h = _header(p)
                if max(w, h) > MAX_SIDE:
                    skipped["image too large"] += 1
                    continue
                if min(w, h) < MIN_SOURCE:
                    skipped["smaller than 32 px"] += 1
                    continue
                entries.append(Entry(p, theme, label, fn[:-4], max(w, h)))
    return entries, skipped


def select_variants(entries: list[Entry], max_variants: int = MAX_VARIANTS) -> list[Entry]:
    """At most ``max_variants`` sizes per (theme, class, stem): smallest, largest, nearest their geometric mean."""
    items: dict[tuple[str, str, str], list[Entry]] = defaultdict(list)
    for e in entries:
        items[(e.theme, e.label, e.stem)].append(e)
    out: list[Entry] = []
    for key in sorted(items):
        # one file per size (a theme may ship 48x48 and 48x48@1x copies): the first path wins
        by_side: dict[int, Entry] = {}
        for e in sorted(items[key], key=lambda e: str(e.path)):
            by_side.setdefault(e.side, e)
        sides = sorted(by_side)
        keep = [sides[0], sides[-1]]
        if len(sides) > 2:
            mid = (sides[0] * sides[-1]) ** 0.5
            keep.append(min(sides[1:-1], key=lambda s: (abs(s - mid), s)))
        out += [by_side[s] for s in sorted(set(keep))[:max_variants]]
    return out


def to_rgb32(path: Path, size: int = SIZE, background: tuple[int, int, int] = BACKGROUND) -> np.ndarray:
    """``path`` as ``size x size x 3`` uint8: alpha composited on ``background``, padded square, Lanczos."""
    try:
        with Image.open(path) as im:
            if max(im.size) > MAX_SIDE:
                raise UserError(f"image is {im.size[0]}x{im.size[1]}, larger than {MAX_SIDE} px", path)
            im.load()  # decodes fully: a truncated file fails here
            rgba = im.convert("RGBA")
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as e:
        if isinstance(e, UserError):
            raise
        raise UserError(f"corrupt or truncated image ({type(e).__name__}: {printable(e)})", path) from None
    side = max(rgba.size)
    canvas = Image.new("RGBA", (side, side), (*background, 255))
    canvas.alpha_composite(rgba, ((side - rgba.size[0]) // 2, (side - rgba.size[1]) // 2))
    rgb = canvas.convert("RGB")
    if side != size:
        rgb = rgb.resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(rgb, dtype=np.uint8)


def image_hash(img: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(img).tobytes()).hexdigest()


def family(theme: str) -> str:
    """The artists' lineage of a theme: forks and copies of one drawing set share one family."""
    return THEME_FAMILIES.get(theme, theme)


def _group_key(e: Entry) -> str:
    return f"{family(e.theme)}/{e.label}/{e.stem.lower()}"


def _near_pairs(imgs: np.ndarray, near: float) -> list[tuple[int, int]]:
    """Pairs ``i < j`` whose RMS difference per value (0-255 scale) is below ``near``."""
    flat = imgs.reshape(len(imgs), -1).astype(np.float32)
    chunk = max(1, min(512, (1 << 26) // max(len(flat), 1)))  # a block of distances stays under 256 MiB
    sq = (flat * flat).sum(1)
    limit = near * near * flat.shape[1]
    pairs: list[tuple[int, int]] = []
    for a in range(0, len(flat), chunk):
        d = sq[a:a + chunk, None] + sq[None] - 2 * flat[a:a + chunk] @ flat.T
        for i, j in zip(*np.nonzero(d < limit)):
            if a + i < j:
                pairs.append((int(a + i), int(j)))
    return pairs


def merge_near(imgs: np.ndarray, labels: np.ndarray, groups: Sequence[str],
               near: float = NEAR_RMS, copy: float = COPY_RMS) -> tuple[list[str], np.ndarray]:
    """Groups joined through near-copies, and a keep mask. A group key starts with its family (``fam/...``).

    Two images of one class and family closer than ``near`` (RMS, 0-255) put their groups together (a
    recoloured or relabelled variant of one drawing must not sit across the split); across families,
    where similar looks are usually independent drawings, only closer than ``copy`` (copied art). Two
    images of different classes closer than ``copy`` are ambiguous and both dropped.
    """
    parent = {g: g for g in groups}

    def root(g: str) -> str:
        while parent[g] != g:
            parent[g] = parent[parent[g]]
            g = parent[g]
        return g

    keep = np.ones(len(labels), dtype=bool)
    for i, j in _near_pairs(imgs, near):
        same_family = groups[i].split("/", 1)[0] == groups[j].split("/", 1)[0]
        if labels[i] == labels[j] and (same_family or _rms(imgs[i], imgs[j]) < copy):
            a, b = sorted((root(groups[i]), root(groups[j])))
            parent[b] = a
        elif labels[i] != labels[j] and _rms(imgs[i], imgs[j]) < copy:
            keep[[i, j]] = False
    return [root(g) for g in groups], keep


def _rms(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


def split_groups(labels: np.ndarray, groups: Sequence[str], test_fraction: float, seed: int) -> np.ndarray:
    """A boolean test mask: per class, whole groups in seeded order, each taken while it fits ``test_fraction``."""
    rng = np.random.default_rng(seed)
    test = np.zeros(len(labels), dtype=bool)
    for k in np.unique(labels):
        idx = np.flatnonzero(labels == k)
        names = sorted({groups[i] for i in idx})
        members: dict[str, list[int]] = defaultdict(list)
        for i in idx:
            members[groups[i]].append(int(i))
        target = round(test_fraction * len(idx))
        taken = 0
        for j in rng.permutation(len(names)):
            size = len(members[names[j]])
            if taken + size > target:  # a group that would overshoot stays in train (big families do)
                continue
            test[members[names[j]]] = True
            taken += size
    return test


def _cap(labels: np.ndarray, groups: Sequence[str], cap: int, seed: int) -> np.ndarray:
    """A keep mask: classes above ``cap`` images lose whole groups, drawn with ``seed``."""
    rng = np.random.default_rng(seed + 1)
    keep = np.ones(len(labels), dtype=bool)
    for k in np.unique(labels):
        idx = np.flatnonzero(labels == k)
        if len(idx) <= cap:
            continue
        members: dict[str, list[int]] = defaultdict(list)
        for i in idx:
            members[groups[i]].append(int(i))
        names = sorted(members)
        total = len(idx)
        for j in rng.permutation(len(names)):
            if total <= cap:
                break
            keep[members[names[j]]] = False
            total -= len(members[names[j]])
    return keep


def convert(roots: Iterable[str | Path], seed: int = 0, test_fraction: float = 1 / 6, cap: int | None = 1200,
            progress: bool = True) -> tuple[ImageDataset, dict[str, object]]:
    """The ``icons`` dataset from extracted theme trees: (ImageDataset, manifest of what was done)."""
    seed = check_seed(seed)
    if not 0 < test_fraction < 1:
        raise UserError(f"test fraction must be in (0, 1), got {test_fraction}")
    roots = [Path(r) for r in roots]
    entries, skipped = scan(roots)
    chosen = select_variants(entries)
    if not chosen:
        raise UserError(f"no PNG icons in class folders ({', '.join(CLASSES)}) found", ", ".join(map(str, roots)))
    if len(chosen) > MAX_IMAGES:  # the near-copy search is quadratic; the real set has about 11,000
        raise UserError(f"{len(chosen)} icons found, more than the {MAX_IMAGES} this converter takes",
                        ", ".join(map(str, roots)))
    imgs = np.empty((len(chosen), SIZE, SIZE, 3), dtype=np.uint8)
    for i, e in enumerate(tqdm(chosen, desc="icons: converting", disable=not progress or len(chosen) < 500)):
        imgs[i] = to_rgb32(e.path)
    # exact duplicates: once per class; an image two classes share is ambiguous and dropped
    first: dict[str, int] = {}
    labels_of: dict[str, set[str]] = defaultdict(set)
    hashes = [image_hash(im) for im in imgs]
    for i, (h, e) in enumerate(zip(hashes, chosen)):
        labels_of[h].add(e.label)
        first.setdefault(h, i)
    keep = np.array([first[h] == i and len(labels_of[h]) == 1 for i, h in enumerate(hashes)], dtype=bool)
    skipped["exact duplicate (same class)"] += sum(1 for i, h in enumerate(hashes)
                                                   if first[h] != i and len(labels_of[h]) == 1)
    skipped["exact duplicate across classes"] += sum(1 for h in hashes if len(labels_of[h]) > 1)
    idx = np.flatnonzero(keep)
    chosen = [chosen[i] for i in idx]
    imgs = imgs[idx]
    y = np.array([CLASSES.index(e.label) for e in chosen], dtype=np.int64)
    groups, near_keep = merge_near(imgs, y, [_group_key(e) for e in chosen])
    skipped["near copy across classes"] += int((~near_keep).sum())
    imgs, y = imgs[near_keep], y[near_keep]
    chosen = [e for e, k in zip(chosen, near_keep) if k]
    groups = [g for g, k in zip(groups, near_keep) if k]
    if cap is not None:
        kept = _cap(y, groups, cap, seed)
        skipped["class cap"] += int((~kept).sum())
        imgs, y = imgs[kept], y[kept]
        chosen = [e for e, k in zip(chosen, kept) if k]
        groups = [g for g, k in zip(groups, kept) if k]
    test = split_groups(y, groups, test_fraction, seed)
    ds = ImageDataset(imgs[~test], y[~test], imgs[test], y[test], list(CLASSES), source=",".join(map(str, roots)),
                      format="npz")
    counts = {c: {"train": int((ds.y_train == k).sum()), "test": int((ds.y_test == k).sum())}
              for k, c in enumerate(CLASSES)}
    themes = Counter(e.theme for e in chosen)
    manifest = {"dataset": NAME, "seed": seed, "test_fraction": test_fraction, "cap": cap, "size": SIZE,
                "background": list(BACKGROUND), "resample": "lanczos", "min_source_px": MIN_SOURCE,
                "max_variants": MAX_VARIANTS, "near_rms": NEAR_RMS, "copy_rms": COPY_RMS,
                "theme_families": THEME_FAMILIES, "classes": list(CLASSES),
                "class_folders": {k: list(v) for k, v in CLASS_FOLDERS.items()}, "counts": counts,
                "themes": dict(sorted(themes.items())), "groups": len(set(groups)),
                "skipped": dict(sorted(skipped.items())),
                # the source of every row, in row order (x_train[i] came from files["train"][i])
                "files": {"train": [_rel(e.path, roots) for e, t in zip(chosen, test) if not t],
                          "test": [_rel(e.path, roots) for e, t in zip(chosen, test) if t]}}
    return ds, manifest


def _rel(path: Path, roots: list[Path]) -> str:
    for r in roots:
        try:
            return str(path.relative_to(r.parent))
        except ValueError:
            continue
    return str(path)


# --- where the converted file lives, and how it is fetched -------------------------------------------
def cache_dirs() -> list[Path]:
    """Where ``icons.npz`` is looked for: ``$UNPOISON_DATA/icons``, ``/usr/share/datasets/icons``, ``~/.cache``."""
    roots = []
    if os.environ.get("UNPOISON_DATA"):
        roots.append(Path(os.environ["UNPOISON_DATA"]) / NAME)
    return roots + [Path("/usr/share/datasets") / NAME, Path.home() / ".cache" / "unpoison" / NAME]


def default_output() -> Path:
    return cache_dirs()[0 if os.environ.get("UNPOISON_DATA") else -1] / FILE_NAME


HOW_TO_GET = ("run 'make rgb-data' where apt-get reaches the Debian archive (it downloads "
              f"{', '.join(PACKAGES)}), or put a converted {FILE_NAME} in $UNPOISON_DATA/{NAME}/")


def find_converted() -> Path:
    """The converted ``icons.npz``, or a one-line :class:`UserError` saying how to get it."""
    tried = [d / FILE_NAME for d in cache_dirs()]
    for p in tried:
        if p.is_file():
            return p
    raise UserError(f"icons dataset not found in {', '.join(map(str, tried))}; {HOW_TO_GET}")


def load(arg: str = "") -> ImageDataset:
    """The registered ``icons`` dataset: ``icons`` (the cache) or ``icons:PATH`` (a converted NPZ)."""
    path = Path(arg).expanduser() if arg else find_converted()
    if not path.is_file():
        raise UserError("no such file", path)
    return FORMATS.get("npz").read(path)


def fetch(src: Path, packages: Sequence[str] = PACKAGES) -> list[Path]:
    """Download the theme packages with ``apt-get download`` and unpack them under ``src`` (no install, no root).

    Idempotent: a package already unpacked (its ``.done`` stamp) is not fetched again.
    """
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise UserError(f"cannot fetch the icon themes here (no apt-get/dpkg-deb); {HOW_TO_GET}")
    src.mkdir(parents=True, exist_ok=True)
    out = []
    for pkg in packages:
        tree = src / pkg
        if not (tree / ".done").is_file():
            debs = src / "debs"
            debs.mkdir(exist_ok=True)
            for old in debs.glob(f"{pkg}_*.deb"):
                old.unlink()
            r = subprocess.run(["apt-get", "download", pkg], cwd=debs, capture_output=True, text=True)
            found = sorted(debs.glob(f"{pkg}_*.deb"))
            if r.returncode != 0 or not found:
                last = (r.stderr.strip().splitlines() or ["no .deb written"])[-1]
                raise UserError(f"apt-get download {pkg} failed ({printable(last)}); run 'apt-get update' "
                                f"first, or {HOW_TO_GET}")
            tmp = src / f".{pkg}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            r = subprocess.run(["dpkg-deb", "-x", str(found[-1]), str(tmp)], capture_output=True, text=True)
            if r.returncode != 0:
                raise UserError(f"dpkg-deb -x failed ({printable(r.stderr.strip()[-200:])})", found[-1])
            version = subprocess.run(["dpkg-deb", "-f", str(found[-1]), "Version"], capture_output=True,
                                     text=True).stdout.strip()
            (tmp / ".done").write_text(json.dumps({"package": pkg, "version": version, "deb": found[-1].name,
                                                   "sha256": _sha256(found[-1])}) + "\n")
            shutil.rmtree(tree, ignore_errors=True)
            tmp.rename(tree)
        out.append(tree)
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _provenance(roots: list[Path]) -> list[dict[str, object]]:
    out = []
    for r in roots:
        stamp = r / ".done"
        if stamp.is_file():
            try:
                out.append(json.loads(stamp.read_text()))
            except (OSError, ValueError):
                out.append({"package": r.name})
        else:
            out.append({"folder": str(r)})
    return out
