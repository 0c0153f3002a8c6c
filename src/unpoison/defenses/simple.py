"""Fixed-transform purifiers the paper compares with (ISS baselines, App. C.2): JPEG, BDR, gray, filters.

None of them learns anything (``fit`` is a no-op). They all map uint8 NHWC to uint8 NHWC. The tensor
ones run vectorised on the chosen device in chunks; JPEG goes through Pillow one image at a time
because no maintained library offers a batched JPEG codec that matches Pillow's output.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.functional import gaussian_blur, rgb_to_grayscale
from tqdm.auto import tqdm

from ..errors import UserError
from ..params import Param
from ..tensors import pick_device
from .base import DEFENSES, Purifier

#: images per device chunk for the tensor purifiers (bounded memory on any dataset size)
_CHUNK = 4096


class _TensorPurifier(Purifier):
    """Shared loop: uint8 NHWC numpy -> float/uint8 NCHW tensor chunks on the device -> back."""

    COMMON = frozenset({"device", "progress"})

    def __init__(self, device: str = "auto", progress: bool = False, **params: Any) -> None:
        super().__init__(**params)
        self.device = device
        self.progress = progress

    def _apply(self, x: torch.Tensor) -> torch.Tensor:  # uint8 NCHW in, uint8 NCHW out
        raise NotImplementedError

    def _check_shape(self, x: np.ndarray) -> None:
        return None

    def _transform(self, x: np.ndarray, y: np.ndarray | None) -> np.ndarray:
        self._check_shape(x)
        dev = pick_device(self.device)
        out = np.empty_like(x)
        for i in tqdm(range(0, len(x), _CHUNK), desc=self.name, disable=not self.progress, leave=False):
            xb = torch.from_numpy(np.ascontiguousarray(x[i:i + _CHUNK])).to(dev).permute(0, 3, 1, 2)
            out[i:i + _CHUNK] = self._apply(xb).permute(0, 2, 3, 1).cpu().numpy()
        return out


def _odd(v: int, name: str, method: str) -> int:
    if v % 2 == 0:
        raise UserError(f"defense {method!r} {name} must be odd, got {v}")
    return v


def _fits_image(size: int, x: np.ndarray, name: str, method: str) -> None:
    h, w = x.shape[1:3]
    if size > min(h, w):
        raise UserError(f"--{name} {size} for {method} is larger than the {h}x{w} images")


@DEFENSES.register("jpeg", help="JPEG compression round trip (Pillow), quality 10 by default (ISS)")
class JPEGPurifier(Purifier):
    """JPEG round trip through Pillow: removes high-frequency perturbations at low quality."""

    PARAMS = {"quality": Param(int, 10, "JPEG quality (lower = stronger purification)", low=1, high=95)}
    COMMON = frozenset({"progress"})

    def __init__(self, quality: int = 10, progress: bool = False) -> None:
        super().__init__(quality=quality)
        self.quality = self.params["quality"]
        self.progress = progress

    def _transform(self, x: np.ndarray, y: np.ndarray | None) -> np.ndarray:
        out = np.empty_like(x)
        gray = x.shape[-1] == 1
        for i in tqdm(range(len(x)), desc="jpeg", disable=not self.progress, leave=False, mininterval=1.0):
            img = Image.fromarray(x[i, :, :, 0] if gray else x[i], mode="L" if gray else "RGB")
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=self.quality)
            buf.seek(0)
            with Image.open(buf) as dec:
                arr = np.asarray(dec.convert("L" if gray else "RGB"))
            out[i] = arr[:, :, None] if gray else arr
        return out


@DEFENSES.register("bdr", help="bit-depth reduction to 2 bits by default (ISS)")
class BitDepthReduction(_TensorPurifier):
    """Quantise each channel to ``2**bits`` evenly spaced levels over 0..255 (round to nearest)."""

    PARAMS = {"bits": Param(int, 2, "bits per channel kept", low=1, high=8)}

    def __init__(self, bits: int = 2, device: str = "auto", progress: bool = False) -> None:
        super().__init__(device=device, progress=progress, bits=bits)
        self.bits = self.params["bits"]

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        levels = 2**self.bits - 1
        # no ties can occur: 2*x*levels is even while 255*(2k+1) is odd (and likewise back)
        q = torch.round(x.float() * (levels / 255.0))
        return torch.round(q * (255.0 / levels)).clamp_(0, 255).to(torch.uint8)


@DEFENSES.register("gray", help="grayscale (ITU-R 601-2 luma, torchvision), kept 3-channel for RGB (ISS)")
class GrayscalePurifier(_TensorPurifier):
    """torchvision's ``rgb_to_grayscale`` replicated to 3 channels; 1-channel data passes unchanged."""

    PARAMS: dict[str, Param] = {}

    def __init__(self, device: str = "auto", progress: bool = False) -> None:
        super().__init__(device=device, progress=progress)

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        return rgb_to_grayscale(x, num_output_channels=x.shape[1]).contiguous()


@DEFENSES.register("gauss", help="Gaussian blur (torchvision, reflect padding)")
class GaussianFilter(_TensorPurifier):
    """Low-pass filter: a classic preprocessing defense against high-frequency poisons."""

    PARAMS = {
        "sigma": Param(float, 1.0, "Gaussian standard deviation in pixels", low=0, low_open=True),
        "kernel_size": Param(int, 3, "odd filter size in pixels, at most the image size", low=1, high=10**6),
    }

    def __init__(self, sigma: float = 1.0, kernel_size: int = 3, device: str = "auto",
                 progress: bool = False) -> None:
        super().__init__(device=device, progress=progress, sigma=sigma, kernel_size=kernel_size)
        self.sigma = self.params["sigma"]
        self.kernel_size = _odd(self.params["kernel_size"], "kernel_size", "gauss")

    def _check_shape(self, x: np.ndarray) -> None:
        _fits_image(self.kernel_size, x, "kernel_size", "gauss")

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        k = self.kernel_size
        return gaussian_blur(x, [k, k], [self.sigma, self.sigma])


@DEFENSES.register("median", help="median filter (kornia, reflect padding)")
class MedianFilter(_TensorPurifier):
    """Median filter: removes sparse / impulsive perturbations while keeping edges."""

    PARAMS = {"size": Param(int, 3, "odd median window size in pixels, at most the image size", low=1, high=10**6)}

    def __init__(self, size: int = 3, device: str = "auto", progress: bool = False) -> None:
        super().__init__(device=device, progress=progress, size=size)
        self.size = _odd(self.params["size"], "size", "median")

    def _check_shape(self, x: np.ndarray) -> None:
        _fits_image(self.size, x, "size", "median")

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        from kornia.filters import median_blur

        # the median of integers is one of them, so the uint8 round trip is exact
        out = median_blur(x.float(), (self.size, self.size), border_type="reflect")
        return out.round_().clamp_(0, 255).to(torch.uint8)
