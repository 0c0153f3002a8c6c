"""ImageNet-subset: an image folder brought to 224 x 224 RGB (spec ``imagenet:PATH``).

Each image's shorter side is resized to 224 (bicubic, Pillow), then the centre 224 x 224 is cut,
the usual evaluation transform. Never auto-detected (a plain folder is read as ``imagefolder``);
written as an ``imagefolder`` of 224 px PNGs, which reads back unchanged.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from .._format import FORMATS, DatasetFormat
from ..dataset import ImageDataset
from .imagefolder import read_image_folder, write_image_folder

SIZE = 224


def resize_center_crop(im: Image.Image, size: int = SIZE) -> Image.Image:
    """Shorter side -> ``size`` (bicubic), then the centre ``size`` x ``size`` crop."""
    w, h = im.size
    if (w, h) != (size, size):
        s = size / min(w, h)
        nw, nh = max(size, round(w * s)), max(size, round(h * s))
        im = im.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        im = im.crop((left, top, left + size, top + size))
    return im


class ImageNetFormat(DatasetFormat):
    name = "imagenet"
    priority = 90
    autodetect = False

    def detect(self, path: Path) -> bool:
        return False

    def read(self, path: Path, mmap: bool = False) -> ImageDataset:
        return read_image_folder(path, self.name, force_rgb=True, size=(SIZE, SIZE), prepare=resize_center_crop)

    def write(self, ds: ImageDataset, path: Path) -> None:
        write_image_folder(ds, path)


FORMATS.register("imagenet", "ImageNet-subset image folder, resized (shorter side) and centre-cropped to 224 RGB")(
    ImageNetFormat())
