"""TAP, targeted adversarial poisoning (Fowl et al., NeurIPS 2021): class-targeted adversarial examples.

A surrogate is trained on the clean data (``train_epochs``); then every image gets ``pgd_steps``
(250) sign-gradient steps toward the target class ``(y + 1) mod K`` through a differentiable random
crop + flip (so the noise survives the victim's augmentation). The noise carries features of the
target class while the label stays the true one, so a model trained on it learns the wrong
association. The surrogate is checkpointed after training; the noise per finished batch.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..params import Param
from ..tensors import augment_batch, crop_pad
from ._surrogate import SURROGATE_PARAMS, SurrogateAttack, poisoned
from .base import register_attack


@register_attack("tap", "targeted adversarial poisoning toward class (y+1) mod K (l_inf 8/255)")
class TAP(SurrogateAttack):
    norm = "linf"
    norms = ("linf", "l2")
    default_eps: ClassVar[dict[str, float]] = {"linf": 8 / 255, "l2": 1.0}
    SMOKE: ClassVar[dict[str, Any]] = {"preset": "cpu", "surrogate": "tinycnn", "train_epochs": 1, "pgd_steps": 2}
    PARAMS: ClassVar[dict[str, Param]] = {
        **SURROGATE_PARAMS,
        "train_epochs": Param(int, 40, "epochs of clean surrogate training", low=1),
        "pgd_steps": Param(int, 250, "targeted PGD steps per image", low=0),
        "step_frac": Param(float, 0.025, "PGD step as a fraction of eps", low=0),
        "augment": Param(bool, True, "differentiable crop + flip inside the attack"),
    }
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "paper": {},
        "cpu": {"surrogate": "smallcnn", "train_epochs": 15, "pgd_steps": 20, "step_frac": 0.2},
    }
    RESUMABLE: ClassVar[frozenset[str]] = frozenset()

    def _craft(self, x: np.ndarray, y: np.ndarray, num_classes: int) -> torch.Tensor:
        self.setup(x, y, num_classes)
        model = self.new_model()
        state = self.load_ckpt()
        t0 = time.perf_counter()
        if state is None:
            train_acc = self.train_epochs(model, self.params["train_epochs"])
            delta = torch.zeros_like(self.x)
            done = 0
            self.save_ckpt({"model": model.state_dict(), "delta": delta.cpu(), "done": 0,
                            "train_acc": torch.tensor(train_acc)})
        else:
            model.load_state_dict(state["model"])
            delta, done, train_acc = state["delta"].to(self.device_), int(state["done"]), float(state["train_acc"])
        t1 = time.perf_counter()
        target = (self.y + 1) % num_classes
        model.eval()
        batches = list(self.batches(shuffle=False))
        bar = self.bar(len(batches), "targeted PGD", initial=done)
        for b, idx in enumerate(batches):
            if b < done:
                continue
            delta[idx], loss = self.targeted(model, self.x[idx], target[idx])
            bar.update(1)
            bar.set_postfix(target_loss=f"{loss:.3f}")
            self.save_ckpt({"model": model.state_dict(), "delta": delta.cpu(), "done": b + 1,
                            "train_acc": torch.tensor(train_acc)})
        bar.close()
        self.info_ = {"surrogate_train_acc_clean": train_acc,
                      "surrogate_acc_poisoned": self.accuracy(model, delta),
                      "target_hit_rate": self.accuracy(model, delta, target),
                      "timings_s_surrogate": t1 - t0, "timings_s_pgd": time.perf_counter() - t1}
        return delta

    def targeted(self, model: nn.Module, xb: torch.Tensor, tb: torch.Tensor) -> tuple[torch.Tensor, float]:
        db = torch.zeros_like(xb)
        step = self.step_size()
        pad = crop_pad(xb.shape[-1])
        loss = torch.zeros(())
        for _ in range(self.params["pgd_steps"]):
            db.requires_grad_(True)
            xa = poisoned(xb, db)
            if self.params["augment"]:
                xa = augment_batch(xa, pad, True, self.gen)
            loss = F.cross_entropy(model(xa), tb)
            (g,) = torch.autograd.grad(loss, db)
            db = self.pgd_step(db.detach(), g, xb, step, descend=True)
        return db.detach(), float(loss.detach())
