"""Training-time defenses (App. C.2): PGD adversarial training (``at``) and UEraser (``ueraser``).

Each entry of :data:`TRAIN_DEFENSES` is a class whose instances are callables ``(model, x, y) -> x'``; its
``PARAMS`` table (name -> (type, default, help)) gives ``unpoison evaluate --train-defense NAME`` its flags
and the benchmark its parameter check.
:func:`unpoison.train.train_classifier` calls it on every batch *after* its own crop/flip, with ``x``
a float batch in [0, 1], and puts the model back in train mode afterwards.

Model modes. Both defenses compute their inner losses with the model in **eval** mode, then
restore the mode they found. For PGD this is the common PyTorch form of the Madry et al. recipe
(e.g. TRADES / MART code): BatchNorm uses running statistics while crafting, so the 10 attack
forward passes neither update the running statistics nor make the perturbation depend on the
other samples in the batch; the weight update itself then happens in train mode on the
adversarial batch. UEraser's loss ranking likewise runs in eval mode under ``no_grad``.

Speed switches (bf16 autocast of the inner forward passes, channels_last) come from an
:class:`~unpoison.accel.Accel`; the default is the scoring loop's, ``Accel.auto(device, "classifier")``.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..accel import Accel
from ..errors import UserError
from ..params import Param, check_params
from ..tags import Tags
from ..utils import parse_fraction
from .base import TRAIN_DEFENSES


def _accel(accel: Accel | None, x: torch.Tensor) -> Accel:
    """The given switches, or the scoring loop's defaults for ``x``'s device (bf16 on CUDA, off on CPU)."""
    return accel or Accel.auto(x.device, "classifier")


def pgd_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float = 8 / 255, steps: int = 10,
               step_size: float = 1.6 / 255, random_start: bool = True,
               generator: torch.Generator | None = None, accel: Accel | None = None) -> torch.Tensor:
    """l_inf PGD maximising cross-entropy; returns ``x + delta`` with ``|delta| <= eps`` and values in [0, 1].

    Gradients are taken w.r.t. the input only (``torch.autograd.grad``), so the model's parameter
    gradients are left untouched. The model's train/eval mode is restored on return.
    """
    acc = _accel(accel, x)
    was_training = model.training
    model.eval()
    x = x.detach()
    if random_start:
        noise = torch.rand(x.shape, device=x.device, generator=generator, dtype=x.dtype)
        delta = (noise * 2 - 1) * eps
    else:
        delta = torch.zeros_like(x)
    delta = ((x + delta).clamp(0, 1) - x)
    try:
        for _ in range(steps):
            delta.requires_grad_(True)
            with acc.autocast(x.device):
                loss = F.cross_entropy(model(x + delta), y)
            (grad,) = torch.autograd.grad(loss, delta)
            with torch.no_grad():
                delta = delta + step_size * grad.sign()
                delta = delta.clamp(-eps, eps)
                delta = (x + delta).clamp(0, 1) - x  # stay a valid image
    finally:
        model.train(was_training)
    return (x + delta).detach()


@TRAIN_DEFENSES.register("at", help="PGD adversarial training (eps 8/255, 10 steps of 1.6/255, random start)")
class AdversarialTraining:
    """Madry PGD adversarial training: the batch is replaced by its PGD adversarial examples."""

    tags: ClassVar[Tags] = Tags(labels=True)

    PARAMS: ClassVar[dict[str, Param]] = {
        "eps": Param(str, "8/255", "PGD radius (l_inf, pixels in [0, 1])"),
        "steps": Param(int, 10, "PGD steps per batch", low=1),
        "step_size": Param(str, "1.6/255", "PGD step size"),
        "random_start": Param(bool, True, "start PGD from a uniform random point in the ball"),
        "seed": Param(int, None, "seed of a local generator for the random start (default: the training run's RNG)",
                      low=0),
    }

    def __init__(self, eps: float | str = "8/255", steps: int = 10, step_size: float | str = "1.6/255",
                 random_start: bool = True, seed: int | None = None, accel: Accel | None = None) -> None:
        p = check_params({"eps": eps, "steps": steps, "step_size": step_size, "random_start": random_start,
                          "seed": seed}, self.PARAMS, "training-time defense 'at'")
        self.eps = parse_fraction(p["eps"], "eps")
        self.step_size = parse_fraction(p["step_size"], "step size")
        if not 0 < self.eps <= 1 or not 0 < self.step_size <= 1:
            raise UserError(f"PGD eps and step size must be in (0, 1], got {self.eps}, {self.step_size}")
        self.steps = p["steps"]
        self.random_start = p["random_start"]
        self.seed = p["seed"]
        self.accel = accel
        self._gen: torch.Generator | None = None

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.seed is not None and (self._gen is None or self._gen.device != x.device):
            self._gen = torch.Generator(device=x.device)
            self._gen.manual_seed(self.seed)
        return pgd_attack(model, x, y, self.eps, self.steps, self.step_size, self.random_start, self._gen,
                          self.accel)

    def __repr__(self) -> str:
        return f"AdversarialTraining(eps={self.eps:.5f}, steps={self.steps}, step_size={self.step_size:.5f})"


def ueraser_augmentation(channels: int) -> nn.Module:
    """UEraser's augmentation pipeline from kornia: plasma brightness/contrast, channel shuffle, erasing.

    UEraser applies plasma brightness (intensity up to 1) and plasma contrast to every image, then
    channel shuffle and TrivialAugment, over hundreds of epochs. With the few epochs of the CPU
    presets that is too destructive (on our toy, plain training with it on clean data lost ~40
    points), so each plasma op here fires with p=0.5 and brightness intensity is at most 0.5;
    TrivialAugment (whose colour ops need RGB) is replaced by random erasing so one pipeline serves
    1- and 3-channel data. Channel shuffle is used for RGB only.
    """
    import kornia.augmentation as K

    ops: list[nn.Module] = [
        K.RandomPlasmaBrightness(roughness=(0.1, 0.7), intensity=(0.0, 0.5), p=0.5),
        K.RandomPlasmaContrast(roughness=(0.1, 0.7), p=0.5),
    ]
    if channels == 3:
        ops.append(K.RandomChannelShuffle(p=0.5))
    ops.append(K.RandomErasing(scale=(0.02, 0.2), p=0.5))
    return K.AugmentationSequential(*ops)


@TRAIN_DEFENSES.register("ueraser", help="UEraser: loss-maximising kornia augmentations (K=5, then K=1)")
class UEraser:
    """UEraser-Max: per sample, keep the augmented copy (of ``repeats``) with the highest loss.

    ``repeats`` copies are drawn while fewer than ``switch_step`` batches have been seen (or the first
    ``switch_frac`` of the run's steps, known once training calls :meth:`begin`), then one (plain random
    augmentation, UEraser's later phase). Neither set: never switches. The step counter lives in the
    callable, so use one instance per training run.
    """

    tags: ClassVar[Tags] = Tags(labels=True, schedule=True)

    PARAMS: ClassVar[dict[str, Param]] = {
        "repeats": Param(int, 5, "augmented copies per sample while in the max phase (K)", low=1),
        "switch_step": Param(int, None, "batches after which to use one copy (default: never)", low=0),
        "switch_frac": Param(float, None, "like switch_step, as a fraction of the run's steps (e.g. 0.8)", low=0,
                             high=1),
    }

    def __init__(self, repeats: int = 5, switch_step: int | None = None, switch_frac: float | None = None,
                 accel: Accel | None = None) -> None:
        p = check_params({"repeats": repeats, "switch_step": switch_step, "switch_frac": switch_frac}, self.PARAMS,
                         "training-time defense 'ueraser'")
        if p["switch_frac"] is not None and p["switch_step"] is not None:
            raise UserError("UEraser takes switch_frac or switch_step, not both")
        self.repeats = p["repeats"]
        self.switch_step = p["switch_step"]
        self.switch_frac = p["switch_frac"]
        self.step = 0
        self.accel = accel
        self._aug: dict[int, nn.Module] = {}

    def begin(self, total_steps: int) -> None:
        """Called by the training loop before its first step: fixes ``switch_step`` from ``switch_frac``."""
        self.step = 0
        if self.switch_frac is not None:
            self.switch_step = int(self.switch_frac * total_steps)

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        if c not in self._aug:
            self._aug[c] = ueraser_augmentation(c)
        return self._aug[c](x).clamp(0, 1)

    def current_repeats(self) -> int:
        if self.switch_step is not None and self.step >= self.switch_step:
            return 1
        return self.repeats

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        k = self.current_repeats()
        self.step += 1
        x = x.detach()
        if k == 1:
            return self.augment(x)
        n = len(x)
        copies = self.augment(x.repeat(k, 1, 1, 1))  # k*n, independent random parameters per copy
        acc = _accel(self.accel, x)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), acc.autocast(x.device):
                losses = F.cross_entropy(model(copies.contiguous(memory_format=acc.memory_format)),
                                         y.repeat(k), reduction="none").float()
        finally:
            model.train(was_training)
        pick = losses.view(k, n).argmax(0)  # per sample: which copy is hardest
        return copies.view(k, n, *x.shape[1:])[pick, torch.arange(n, device=x.device)]

    def __repr__(self) -> str:
        return f"UEraser(repeats={self.repeats}, switch_step={self.switch_step})"

