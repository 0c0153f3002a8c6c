"""EM, sample-wise error-minimizing noise (Huang et al., ICLR 2021): a min-min bi-level problem.

Per outer round: ``train_steps`` SGD steps on the surrogate with the current poisoned images, then
``pgd_steps`` sign-gradient steps of ``step_frac * eps`` (0.8/255 at 8/255) that *lower* the
surrogate's loss, for every image. Stops when the surrogate's accuracy on the poisoned images
exceeds ``stop_acc`` (99%) or after ``rounds``. Checkpointed after every round (``resume``).
"""

from __future__ import annotations

import time
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from ._surrogate import SURROGATE_PARAMS, SurrogateAttack
from .base import register_attack


@register_attack("em", "error-minimizing noise: min-min with a surrogate (l_inf 8/255)")
class EM(SurrogateAttack):
    norm = "linf"
    norms = ("linf", "l2")
    default_eps: ClassVar[dict[str, float]] = {"linf": 8 / 255, "l2": 1.0}
    PARAMS: ClassVar[dict[str, tuple[type, Any, str]]] = {
        **SURROGATE_PARAMS,
        "rounds": (int, 100, "most outer rounds (each: train_steps model steps, pgd_steps noise steps)"),
        "train_steps": (int, 10, "surrogate SGD steps per round"),
        "pgd_steps": (int, 20, "noise steps per round (every image)"),
        "step_frac": (float, 0.1, "noise step as a fraction of eps (0.8/255 at 8/255)"),
        "stop_acc": (float, 99.0, "stop once the surrogate's accuracy on poisoned data exceeds this (%)"),
    }
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "paper": {},
        "cpu": {"surrogate": "smallcnn", "rounds": 40, "pgd_steps": 10, "step_frac": 0.2},
    }

    def _craft(self, x: np.ndarray, y: np.ndarray, num_classes: int) -> torch.Tensor:
        self.setup(x, y, num_classes)
        model = self.new_model()
        opt = self.new_opt(model)
        delta = self.init_delta()
        start, history = 0, []
        state = self.load_ckpt()
        if state is not None:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            delta = state["delta"].to(self.device)
            start, history = int(state["round"]), [dict(zip(("loss", "acc"), h)) for h in state["history"].tolist()]
        batches = self.endless_batches()
        bar = self.bar(self.params["rounds"], "rounds", initial=start)
        acc = history[-1]["acc"] if history else 0.0
        t0 = time.perf_counter()
        for rnd in range(start, self.params["rounds"]):
            if acc > self.params["stop_acc"]:
                break
            model.train()
            for _ in range(self.params["train_steps"]):
                idx = next(batches)
                loss = F.cross_entropy(model((self.x[idx] + delta[idx]).clamp(0, 1)), self.y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            delta = self.minimize_noise(model, delta)
            loss_p = self.mean_loss(model, delta)
            acc = self.accuracy(model, delta)
            history.append({"loss": loss_p, "acc": acc})
            bar.update(1)
            bar.set_postfix(loss=f"{loss_p:.4f}", surrogate_acc=f"{acc:.1f}")
            self.save_ckpt({"model": model.state_dict(), "opt": opt.state_dict(), "delta": delta.cpu(),
                            "round": rnd + 1, "history": torch.tensor([[h["loss"], h["acc"]] for h in history])})
        bar.close()
        self.info_ = {"surrogate_acc_poisoned": acc, "rounds_run": len(history), "history": history,
                      "surrogate_loss_poisoned": history[-1]["loss"] if history else None,
                      "surrogate_loss_clean": self.mean_loss(model), "timings_s_rounds": time.perf_counter() - t0}
        self.surrogate_ = model
        return delta

    def minimize_noise(self, model: torch.nn.Module, delta: torch.Tensor) -> torch.Tensor:
        model.eval()
        step = self.step_size()
        for idx in self.batches(shuffle=False):
            xb, yb, db = self.x[idx], self.y[idx], delta[idx].clone()
            for _ in range(self.params["pgd_steps"]):
                db.requires_grad_(True)
                loss = F.cross_entropy(model((xb + db).clamp(0, 1)), yb)
                (g,) = torch.autograd.grad(loss, db)
                db = self.pgd_step(db.detach(), g, xb, step, descend=True)
            delta[idx] = db.detach()
        return delta
