"""Shared machinery of the surrogate-based attacks (EM, REM, TAP, SEP): one code path for CPU and CUDA.

Images and the perturbation live on the device as float NCHW tensors; surrogates come from
:func:`unpoison.models.create_model`; PGD steps in l_inf (sign) or l2 (normalised gradient);
checkpoints are written atomically and read with ``torch.load(weights_only=True)``. A checkpoint
carries every RNG state the attack draws from (its generators, torch's global CPU and CUDA ones) and
the position in the current data order, so a resumed run continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .. import rng
from ..checkpoints import load_state, save_state
from ..data.fingerprint import content_fingerprint
from ..errors import UserError, check_finite_loss
from ..models import MODELS, create_model
from ..params import Param
from ..tensors import augment_batch, crop_pad, sgd_cosine
from .base import Attack, project, to_float_nchw

#: parameters every surrogate attack takes
SURROGATE_PARAMS: dict[str, Param] = {
    "surrogate": Param(str, "resnet18", "surrogate classifier (any registered model)"),
    "batch_size": Param(int, 128, "batch size for surrogate training and noise updates", low=1),
    "lr": Param(float, 0.1, "surrogate SGD learning rate", low=0, low_open=True),
}
#: the alternating loop of the min-min attacks (EM, REM): rounds of surrogate steps, then noise steps
ROUND_PARAMS: dict[str, Param] = {
    "rounds": Param(int, 100, "most outer rounds (each: train_steps model steps, pgd_steps noise steps)", low=1),
    "train_steps": Param(int, 10, "surrogate SGD steps per round", low=0),
    "pgd_steps": Param(int, 20, "noise steps per round (every image)", low=0),
    "step_frac": Param(float, 0.1, "noise step as a fraction of eps (0.8/255 at 8/255)", low=0),
}


def poisoned(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``x + delta`` for a ``delta`` kept valid by :meth:`SurrogateAttack.clip_valid`, without a clamp in
    the autograd graph: torch's clamp passes *zero* gradient at exactly 0 and 1, so ``(x + delta).clamp(0, 1)``
    would freeze every saturated pixel (half of Fashion-MNIST, its black background) at its start value and
    leave the perturbation only the object to work with."""
    return x + delta


class SurrogateAttack(Attack):
    """Base of the surrogate attacks: data on device, model factory, PGD, checkpoints, progress."""

    uses_surrogate: ClassVar[bool] = True
    supports_checkpoint: ClassVar[bool] = True
    #: parameters a resumed run may change (e.g. more rounds)
    RESUMABLE: ClassVar[frozenset[str]] = frozenset({"rounds", "stop_acc"})

    # --- set-up ----------------------------------------------------------------------------------
    def check_params(self) -> None:
        MODELS.get(self.params["surrogate"])  # an unknown surrogate fails here, not after loading the data

    def setup(self, x: np.ndarray, y: np.ndarray, num_classes: int) -> None:
        # resume key: the images and labels themselves, not their shape (a changed image must not resume)
        self.data_fp = content_fingerprint(x, np.asarray(y).astype(np.int64, copy=False))
        self.x = to_float_nchw(x, self.device_)
        self.y = torch.as_tensor(y, device=self.device_)
        self.num_classes = num_classes
        self.gen = torch.Generator(device=self.device_)
        self.gen.manual_seed(self.seed)
        self.cpu_gen = torch.Generator().manual_seed(self.seed)

    def new_model(self) -> nn.Module:
        _, c, h, w = self.x.shape
        return create_model(self.params["surrogate"], self.num_classes, c, max(h, w)).to(self.device_)

    def new_opt(self, model: nn.Module, lr: float | None = None) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=lr or self.params["lr"], momentum=0.9, weight_decay=5e-4)

    def batches(self, shuffle: bool = True) -> Iterator[torch.Tensor]:
        n, bs = len(self.x), self.params["batch_size"]
        order = torch.randperm(n, device=self.device_, generator=self.gen) if shuffle else torch.arange(
            n, device=self.device_)
        for i in range(0, n, bs):
            yield order[i:i + bs]

    def endless_batches(self) -> BatchStream:
        """Shuffled batches pass after pass; its position goes into checkpoints (:class:`BatchStream`)."""
        return BatchStream(self)

    def step_size(self) -> float:
        return self.params["step_frac"] * self.eps_

    def bar(self, total: int, desc: str, initial: int = 0) -> tqdm:
        return tqdm(total=total, initial=initial, desc=f"{self.name}: {desc}", disable=not self.progress,
                    leave=False, dynamic_ncols=True)

    # --- surrogate training ---------------------------------------------------------------------
    def train_epochs(self, model: nn.Module, epochs: int, delta: torch.Tensor | None = None, augment: bool = True,
                     on_epoch: Callable[[int, nn.Module], None] | None = None, desc: str = "train surrogate") -> float:
        """Plain SGD + cosine schedule on ``x (+ delta)``; returns the last epoch's training accuracy (%)."""
        steps = epochs * math.ceil(len(self.x) / self.params["batch_size"])
        opt, sched = sgd_cosine(model.parameters(), self.params["lr"], steps)
        acc = 0.0
        bar = self.bar(epochs, desc)
        for ep in range(epochs):
            model.train()
            correct, loss_sum = 0, 0.0
            for idx in self.batches():
                xb = self.x[idx] if delta is None else (self.x[idx] + delta[idx]).clamp(0, 1)
                if augment:
                    xb = augment_batch(xb, crop_pad(xb.shape[-1]), True, self.gen)
                out = model(xb)
                loss = F.cross_entropy(out, self.y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                correct += int((out.argmax(1) == self.y[idx]).sum())
                loss_sum += float(loss.detach()) * len(idx)
            acc = 100.0 * correct / len(self.x)
            check_finite_loss(loss_sum, f"{self.name}: surrogate training", ep + 1)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum / len(self.x):.3f}", acc=f"{acc:.1f}")
            if on_epoch is not None:
                on_epoch(ep, model)
        bar.close()
        return acc

    def run_min_min(
        self,
        train_loss: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
        minimize_noise: Callable[[nn.Module, torch.Tensor], torch.Tensor],
    ) -> tuple[nn.Module, torch.Tensor]:
        """The outer loop EM and REM share: per round ``train_steps`` model steps on ``train_loss(model, idx,
        delta)``, then ``minimize_noise``; stops above ``stop_acc`` or after ``rounds``; checkpoints each round."""
        model = self.new_model()
        opt = self.new_opt(model)
        delta = self.init_delta()
        start, history = 0, []
        batches = self.endless_batches()
        state = self.load_ckpt()
        if state is not None:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            delta = state["delta"].to(self.device_)
            start, history = int(state["round"]), [dict(zip(("loss", "acc"), h)) for h in state["history"].tolist()]
            if "batches" in state:
                batches.load_state_dict(state["batches"])
        bar = self.bar(self.params["rounds"], "rounds", initial=start)
        acc = history[-1]["acc"] if history else 0.0
        t0 = time.perf_counter()
        for rnd in range(start, self.params["rounds"]):
            if acc > self.params["stop_acc"]:
                break
            for _ in range(self.params["train_steps"]):
                loss = train_loss(model, next(batches), delta)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            delta = minimize_noise(model, delta)
            loss_p = self.mean_loss(model, delta)
            check_finite_loss(loss_p, f"{self.name}: min-min", rnd + 1, unit="round")  # before it is checkpointed
            acc = self.accuracy(model, delta)
            history.append({"loss": loss_p, "acc": acc})
            bar.update(1)
            bar.set_postfix(loss=f"{loss_p:.4f}", surrogate_acc=f"{acc:.1f}")
            self.save_ckpt({"model": model.state_dict(), "opt": opt.state_dict(), "delta": delta.cpu(),
                            "round": rnd + 1, "history": torch.tensor([[h["loss"], h["acc"]] for h in history]),
                            "batches": batches.state_dict()})
        bar.close()
        self.info_ = {"surrogate_acc_poisoned": acc, "rounds_run": len(history), "history": history,
                      "surrogate_loss_poisoned": history[-1]["loss"] if history else None,
                      "surrogate_loss_clean": self.mean_loss(model), "timings_s_rounds": time.perf_counter() - t0}
        return model, delta

    @torch.no_grad()
    def accuracy(self, model: nn.Module, delta: torch.Tensor | None = None,
                 labels: torch.Tensor | None = None) -> float:
        """Accuracy (%) of ``model`` on ``x (+ delta)`` against ``labels`` (default the true labels)."""
        model.eval()
        labels = self.y if labels is None else labels
        correct = 0
        for idx in self.batches(shuffle=False):
            xb = self.x[idx] if delta is None else (self.x[idx] + delta[idx]).clamp(0, 1)
            correct += int((model(xb).argmax(1) == labels[idx]).sum())
        return 100.0 * correct / len(self.x)

    @torch.no_grad()
    def mean_loss(self, model: nn.Module, delta: torch.Tensor | None = None) -> float:
        model.eval()
        tot = 0.0
        for idx in self.batches(shuffle=False):
            xb = self.x[idx] if delta is None else (self.x[idx] + delta[idx]).clamp(0, 1)
            tot += float(F.cross_entropy(model(xb), self.y[idx], reduction="sum"))
        return tot / len(self.x)

    # --- perturbation updates --------------------------------------------------------------------
    def init_delta(self, random: bool = True) -> torch.Tensor:
        if not random:
            return torch.zeros_like(self.x)
        u = torch.rand(self.x.shape, generator=self.cpu_gen).to(self.device_) * 2 - 1
        return self.clip_valid(project(u * self.eps_ if self.norm_used == "linf" else u, self.norm_used, self.eps_),
                               self.x)

    def clip_valid(self, delta: torch.Tensor, xb: torch.Tensor) -> torch.Tensor:
        """Keep x + delta inside [0, 1] (after projecting onto the norm ball, which this preserves)."""
        return (xb + delta).clamp(0, 1) - xb

    def pgd_step(self, delta: torch.Tensor, grad: torch.Tensor, xb: torch.Tensor, step: float,
                 descend: bool = True) -> torch.Tensor:
        """One projected step on ``delta`` (descent by default): sign step (l_inf), normalised step (l2)."""
        sgn = -1.0 if descend else 1.0
        if self.norm_used == "linf":
            delta = delta + sgn * step * grad.sign()
        else:
            g = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
            delta = delta + sgn * step * g  # l2 step of length `step`
        return self.clip_valid(project(delta, self.norm_used, self.eps_), xb)

    # --- checkpoints -----------------------------------------------------------------------------
    def fingerprint(self) -> str:
        params = {k: v for k, v in self.params.items() if k not in self.RESUMABLE}
        key = {"attack": self.name, "eps": self.eps_, "norm": self.norm_used, "params": params,
               "seed": self.seed, "data": self.data_fp}
        return hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()

    def ckpt_path(self) -> Path | None:
        return None if self.checkpoint_dir is None else Path(self.checkpoint_dir) / f"{self.name}.pt"

    def save_ckpt(self, state: dict[str, Any]) -> None:
        path = self.ckpt_path()
        if path is None:
            return
        save_state(path, {**state, "fingerprint": self.fingerprint(), "rng": rng.capture(self.generators())})

    def load_ckpt(self) -> dict[str, Any] | None:
        """The saved state if ``resume`` and a checkpoint of this very run exists; else ``None``."""
        path = self.ckpt_path()
        if path is None or not self.resume or not path.exists():
            return None
        state = load_state(path, fingerprint=self.fingerprint(),
                           other_run="checkpoint belongs to a different run (the images, labels, attack or "
                                     "parameters differ); remove it or run without --resume")
        rng.restore(state["rng"], self.generators(), path)
        return state

    def generators(self) -> dict[str, torch.Generator]:
        """The explicit generators: ``gen`` on the device (data order, augmentation, noise), ``cpu_gen``."""
        return {"gen": self.gen, "cpu_gen": self.cpu_gen}


class BatchStream:
    """Endless shuffled batches of an attack's data: a fresh permutation (from ``attack.gen``) per pass.

    Its state (the current permutation and the position in it) is checkpointed, so a run resumed
    mid-pass takes the same batches the uninterrupted run would have taken.
    """

    def __init__(self, attack: SurrogateAttack) -> None:
        self.attack = attack
        self.order: torch.Tensor | None = None
        self.pos = 0

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        n, bs = len(self.attack.x), self.attack.params["batch_size"]
        if self.order is None or self.pos >= n:
            self.order = torch.randperm(n, device=self.attack.device_, generator=self.attack.gen)
            self.pos = 0
        idx = self.order[self.pos:self.pos + bs]
        self.pos += bs
        return idx

    def state_dict(self) -> dict[str, Any]:
        order = torch.empty(0, dtype=torch.long) if self.order is None else self.order.cpu()
        return {"order": order, "pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        order = state["order"]
        self.order = order.to(self.attack.device_) if len(order) else None
        self.pos = int(state["pos"])


def last_linear(model: nn.Module) -> nn.Linear:
    """The classifier head (last ``nn.Linear``), whose input is the penultimate feature."""
    lin = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not lin:
        raise UserError(f"surrogate {type(model).__name__} has no linear head to take features from")
    return lin[-1]


class FeatureTap:
    """Context manager recording the head's input (penultimate features) on every forward pass."""

    def __init__(self, model: nn.Module) -> None:
        self.head = last_linear(model)
        self.feat: torch.Tensor | None = None

    def __enter__(self) -> FeatureTap:
        self.handle = self.head.register_forward_hook(lambda m, inp, out: setattr(self, "feat", inp[0]))
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()
