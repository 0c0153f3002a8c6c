"""Tensor plumbing shared by attacks, defenses and the scoring protocol.

Device choice, uint8 images moved to the device, vectorised batch augmentation, the SGD + cosine
recipe, and seeded RNG scopes. It imports nothing of unpoison but :mod:`unpoison.errors`, so the
attacks, the defenses and the training loop can all build on it without importing each other.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .errors import UserError

#: a training-time defense: (model, x in [0,1] augmented batch, y) -> batch to train on. It may also have
#: ``begin(total_steps)``, called once before training (for schedules that depend on the run's length).
TrainDefense = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def pick_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` -> CUDA when present, else CPU. Any explicit torch device string is honoured."""
    if isinstance(device, torch.device):
        return device
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise UserError(f"bad --device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device} asked for, but no CUDA device is available")
    return dev


@contextlib.contextmanager
def rng_scope(seed: int, device: str | torch.device | None = None) -> Iterator[None]:
    """Run a block with torch's default generator (CPU, and ``device``'s when it is CUDA) seeded to
    ``seed``, then put the caller's generator state back.

    Explicit ``torch.Generator`` objects are used wherever torch takes one; this scope covers what
    cannot take one (module weight initialisation, kornia's and diffusers' samplers), so library
    calls are reproducible without reseeding the caller's process-wide RNG for good.
    """
    dev = pick_device(device) if device is not None else torch.device("cpu")
    cuda = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.random.default_generator.manual_seed(int(seed))
        for i in cuda:
            with torch.cuda.device(i):
                torch.cuda.manual_seed(int(seed))
        yield


def to_device_images(x: np.ndarray, device: torch.device | str, chunk: int = 8192) -> torch.Tensor:
    """uint8 NHWC numpy (maybe memory-mapped) -> uint8 NCHW tensor on ``device``, in chunks."""
    out = torch.empty((len(x), x.shape[3], x.shape[1], x.shape[2]), dtype=torch.uint8, device=device)
    for i in range(0, len(x), chunk):
        out[i:i + chunk] = torch.from_numpy(np.array(x[i:i + chunk])).to(device).permute(0, 3, 1, 2)  # copy: mmap-safe
    return out


def crop_pad(image_size: int) -> int:
    """Zero padding of the random crop: 4 px at CIFAR size (the protocol's), 2 px below 32 px."""
    return 2 if image_size < 32 else 4


def augment_batch(x: torch.Tensor, pad: int, flip: bool, gen: torch.Generator | None = None) -> torch.Tensor:
    """Random crop (zero padding ``pad``) and horizontal flip of a float NCHW batch, vectorised."""
    n, _, h, w = x.shape
    dev = x.device
    if pad > 0:
        xp = F.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n,), device=dev, generator=gen)
        dx = torch.randint(0, 2 * pad + 1, (n,), device=dev, generator=gen)
        rows = (dy[:, None] + torch.arange(h, device=dev)[None]).view(n, 1, h, 1).expand(-1, x.shape[1], h, w + 2 * pad)
        xp = xp.gather(2, rows)
        cols = (dx[:, None] + torch.arange(w, device=dev)[None]).view(n, 1, 1, w).expand(-1, x.shape[1], h, w)
        x = xp.gather(3, cols)
    if flip:
        m = torch.rand(n, device=dev, generator=gen) < 0.5
        x = torch.where(m[:, None, None, None], x.flip(3), x)
    return x


def sgd_cosine(params: Iterable[torch.nn.Parameter], lr: float, total_steps: int, momentum: float = 0.9,
               weight_decay: float = 5e-4, warmup_steps: int = 0
               ) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.LRScheduler]:
    """The classifier recipe the scoring protocol and the attacks' surrogates share: SGD with momentum
    and weight decay, cosine-annealed to 0 over ``total_steps`` optimizer steps, after ``warmup_steps``
    of linear warm-up from ``lr / warmup_steps`` (0: none, the plain cosine schedule)."""
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=False)
    warmup_steps = min(int(warmup_steps), max(0, total_steps - 1))
    if warmup_steps <= 0:
        return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total_steps))
    warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0 / warmup_steps, total_iters=warmup_steps)
    cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps - warmup_steps)
    return opt, torch.optim.lr_scheduler.SequentialLR(opt, [warm, cos], milestones=[warmup_steps])
