"""The speed switches of the training and inference loops, in one place.

Every loop that can run faster on a GPU (D-VAE training and inference, the scoring protocol, PGD
adversarial training, UEraser, AVATAR's training and sampling) takes an :class:`Accel` instead of
testing ``device.type == "cuda"`` inside its loop. :meth:`Accel.auto` gives each loop's defaults
(the table below); tests force any switch on for CPU (torch runs bf16 autocast, fused Adam,
channels_last and inductor's ``torch.compile`` there too), so every CUDA code path runs in CI.

Defaults (``Accel.auto``), per loop:

=============  ============================  ================================================
loop           CUDA                          CPU
=============  ============================  ================================================
``dvae``       bf16, fused Adam, compile,    bf16 autocast in training where the CPU has bf16
               channels_last, infer 1024     units (AMX / AVX512-BF16: a training step x1.45 at
                                             width 16, x1.23 at width 8; fp32 inference);
                                             channels_last only for widths 8..32 (measured:
                                             width 8 x1.09, width 64 x0.65), infer 256
``classifier`` bf16, channels_last           channels_last (oneDNN is faster with it)
``diffusion``  bf16                          nothing
=============  ============================  ================================================

A loop ignores the switches it has no use for (the classifier's SGD has no fused-Adam switch).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import torch

from .errors import UserError

Loop = Literal["dvae", "classifier", "diffusion"]
LOOPS: tuple[str, ...] = ("dvae", "classifier", "diffusion")


def dvae_channels_last(width: int, device: torch.device | str) -> bool:
    """channels_last on CUDA; on CPU only for narrow D-VAEs (8 <= width <= 32).

    Measured on CPU (docs/results/purify_speed.md): width 8 trains 1.09x faster in channels_last,
    width 64 0.65x (slower). torch 2.14's CPU kernels also corrupt the heap on channels_last convs
    with 2 channels (seen with width 4, one thread), which this rule never picks."""
    if torch.device(device).type == "cuda":
        return True
    return 8 <= width <= 32


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AMX tiles or AVX512-BF16); elsewhere bf16 is emulated and slower."""
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


@dataclass(frozen=True)
class Accel:
    """Which speed switches a loop uses. Build with :meth:`auto` (the defaults) or :meth:`off` (fp32 eager)."""

    bf16: bool = False  # bf16 autocast around forward passes; losses are computed in fp32
    fused_adam: bool = False  # fused Adam / AdamW kernels (D-VAE, AVATAR)
    compile: bool = False  # torch.compile of the D-VAE's conv stacks (encoder and decoders)
    channels_last: bool = False  # NHWC memory format for the model and its input batches
    infer_batch: int = 256  # images per batch in batched inference
    bf16_infer: bool | None = None  # bf16 autocast in inference too (None: as ``bf16``)

    def __post_init__(self) -> None:
        if int(self.infer_batch) != self.infer_batch or self.infer_batch < 1:
            raise UserError(f"inference batch must be a positive integer, got {self.infer_batch!r}")

    @classmethod
    def auto(cls, device: torch.device | str, loop: Loop = "dvae", width: int | None = None,
             **overrides: Any) -> Accel:
        """The defaults of ``loop`` on ``device`` (module table); ``width`` is the D-VAE's; overrides win."""
        if loop not in LOOPS:
            raise ValueError(f"unknown loop {loop!r}; known: {', '.join(LOOPS)}")
        cuda = torch.device(device).type == "cuda"
        if loop == "dvae":
            # CPU: bf16 trains faster on bf16 units; inference (about 1 % of a purification) stays fp32 so the
            # written images do not move by the grey level bf16's rounding can cost
            base = cls(bf16=cuda or cpu_has_bf16(), fused_adam=cuda, compile=cuda,
                       channels_last=dvae_channels_last(64 if width is None else width, device),
                       infer_batch=1024 if cuda else 256, bf16_infer=None if cuda else False)
        elif loop == "classifier":
            base = cls(bf16=cuda, channels_last=True, infer_batch=512)
        else:
            base = cls(bf16=cuda)
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})

    @classmethod
    def off(cls, **overrides: Any) -> Accel:
        """Every switch off: the fp32, eager, NCHW reference path."""
        return cls(**overrides)

    def with_(self, **changes: Any) -> Accel:
        """A copy with some switches changed."""
        return replace(self, **changes)

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def autocast(self, device: torch.device | str) -> torch.autocast:
        """The autocast context for forward passes on ``device`` (a no-op unless ``bf16``)."""
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=self.bf16)

    def infer_autocast(self, device: torch.device | str) -> torch.autocast:
        """The autocast context for inference passes (``bf16_infer``, or ``bf16`` when that is None)."""
        on = self.bf16 if self.bf16_infer is None else self.bf16_infer
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=on)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
