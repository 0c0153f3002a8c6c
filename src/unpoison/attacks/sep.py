"""SEP, self-ensemble protection (Chen et al., ICLR 2023): checkpoints of one training run as an ensemble.

One surrogate is trained on the clean data for ``train_epochs``; ``n_checkpoints`` copies saved at
evenly spaced epochs form the ensemble. Each image is then perturbed by PGD with

* feature alignment (FA): the loss pulls the image's penultimate feature, under every checkpoint,
  onto that checkpoint's clean feature centroid of the nearest *other* class (cosine distance), so
  the image looks like another class to every stage of training;
* variance reduction (VR, SVRE-style): each outer step takes the ensemble-mean gradient ``G`` at the
  current point, then ``vr_inner`` inner steps on single random checkpoints m with the corrected
  gradient ``g_m(inner) - g_m(outer) + G``; the outer step follows the summed inner gradients.

Our reading of the original description (docs/design.md, "Attacks": the paper gives only "PGD with feature
alignment and variance reduction"); steps, checkpoints and epochs are parameters.
"""

from __future__ import annotations

import copy
import time
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..params import Param
from ._surrogate import SURROGATE_PARAMS, FeatureTap, SurrogateAttack, poisoned
from .base import register_attack


@register_attack("sep", "self-ensemble protection: checkpoint ensemble, feature alignment, variance reduction")
class SEP(SurrogateAttack):
    norm = "linf"
    norms = ("linf", "l2")
    default_eps: ClassVar[dict[str, float]] = {"linf": 8 / 255, "l2": 1.0}
    SMOKE: ClassVar[dict[str, Any]] = {
        "preset": "cpu", "surrogate": "tinycnn", "train_epochs": 2, "n_checkpoints": 2, "pgd_steps": 2,
        "vr_inner": 1}
    PARAMS: ClassVar[dict[str, Param]] = {
        **SURROGATE_PARAMS,
        "train_epochs": Param(int, 120, "epochs of the clean training run that yields the checkpoints", low=1),
        "n_checkpoints": Param(int, 15, "checkpoints (evenly spaced epochs) forming the ensemble", low=1),
        "pgd_steps": Param(int, 30, "outer PGD steps per image", low=0),
        "step_frac": Param(float, 0.1, "outer step as a fraction of eps", low=0),
        "vr_inner": Param(int, 15, "variance-reduced inner steps per outer step (0: plain ensemble PGD)", low=0),
    }
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "paper": {},
        "cpu": {"surrogate": "smallcnn", "train_epochs": 15, "n_checkpoints": 3, "pgd_steps": 8,
                "step_frac": 0.25, "vr_inner": 2},
    }
    RESUMABLE: ClassVar[frozenset[str]] = frozenset()

    def _craft(self, x: np.ndarray, y: np.ndarray, num_classes: int) -> torch.Tensor:
        self.setup(x, y, num_classes)
        t0 = time.perf_counter()
        e, m = self.params["train_epochs"], max(1, self.params["n_checkpoints"])
        save_at = sorted({max(0, round((i + 1) * e / m) - 1) for i in range(m)})
        state = self.load_ckpt()
        models: list[nn.Module] = []
        if state is None:
            snaps: list[dict[str, torch.Tensor]] = []
            train_acc = self.train_epochs(self.new_model(), e, on_epoch=lambda ep, mod: snaps.append(
                copy.deepcopy(mod.state_dict())) if ep in save_at else None, desc="train self-ensemble")
            delta, done = torch.zeros_like(self.x), 0
        else:
            snaps = [state[f"ckpt{i}"] for i in range(int(state["n"]))]
            delta, done, train_acc = state["delta"].to(self.device_), int(state["done"]), float(state["train_acc"])
        for sd in snaps:
            mod = self.new_model()
            mod.load_state_dict(sd)
            models.append(mod.eval())
        snap_state = {f"ckpt{i}": sd for i, sd in enumerate(snaps)} | {"n": len(snaps),
                                                                        "train_acc": torch.tensor(train_acc)}
        if state is None:
            self.save_ckpt({**snap_state, "delta": delta.cpu(), "done": 0})
        t1 = time.perf_counter()
        self.centroids = [self.class_centroids(mod) for mod in models]
        target = self.nearest_other_class(models[-1], self.centroids[-1])
        batches = list(self.batches(shuffle=False))
        bar = self.bar(len(batches), "ensemble PGD", initial=done)
        for b, idx in enumerate(batches):
            if b < done:
                continue
            delta[idx], loss = self.perturb(models, self.x[idx], target[idx])
            bar.update(1)
            bar.set_postfix(align_loss=f"{loss:.3f}")
            self.save_ckpt({**snap_state, "delta": delta.cpu(), "done": b + 1})
        bar.close()
        accs = [self.accuracy(mod, delta) for mod in models]
        self.info_ = {"surrogate_train_acc_clean": train_acc, "n_checkpoints": len(models),
                      "checkpoint_epochs": [s + 1 for s in save_at],
                      "surrogate_acc_poisoned": accs[-1], "ensemble_acc_poisoned": accs,
                      "timings_s_surrogate": t1 - t0, "timings_s_pgd": time.perf_counter() - t1}
        return delta

    @torch.no_grad()
    def class_centroids(self, model: nn.Module) -> torch.Tensor:
        """K x F unit-norm mean penultimate feature of each class on clean data."""
        with FeatureTap(model) as tap:
            sums = None
            for idx in self.batches(shuffle=False):
                model(self.x[idx])
                f = F.normalize(tap.feat.flatten(1), dim=1)
                if sums is None:
                    sums = torch.zeros(self.num_classes, f.shape[1], device=self.device_)
                sums.index_add_(0, self.y[idx], f)
        return F.normalize(sums, dim=1)  # type: ignore[arg-type]

    @torch.no_grad()
    def nearest_other_class(self, model: nn.Module, cent: torch.Tensor) -> torch.Tensor:
        with FeatureTap(model) as tap:
            out = torch.empty_like(self.y)
            for idx in self.batches(shuffle=False):
                model(self.x[idx])
                sim = F.normalize(tap.feat.flatten(1), dim=1) @ cent.T
                sim[torch.arange(len(idx)), self.y[idx]] = -2.0
                out[idx] = sim.argmax(1)
        return out

    def grad(self, i: int, model: nn.Module, xb: torch.Tensor, db: torch.Tensor,
             tb: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Gradient of the FA loss (1 - cosine to the target centroid) of checkpoint ``i`` w.r.t. delta."""
        db = db.detach().requires_grad_(True)
        with FeatureTap(model) as tap:
            model(poisoned(xb, db))
            f = F.normalize(tap.feat.flatten(1), dim=1)
        loss = (1 - (f * self.centroids[i][tb]).sum(1)).mean()
        (g,) = torch.autograd.grad(loss, db)
        return g, float(loss.detach())

    def perturb(self, models: list[nn.Module], xb: torch.Tensor, tb: torch.Tensor) -> tuple[torch.Tensor, float]:
        db = torch.zeros_like(xb)
        step = self.step_size()
        k = self.params["vr_inner"]
        loss = 0.0
        for _ in range(self.params["pgd_steps"]):
            gs = [self.grad(i, mod, xb, db, tb) for i, mod in enumerate(models)]
            g_ens = torch.stack([g for g, _ in gs]).mean(0)
            loss = float(np.mean([v for _, v in gs]))
            if k <= 0 or len(models) == 1:
                db = self.pgd_step(db, g_ens, xb, step)
                continue
            inner, acc = db.clone(), torch.zeros_like(db)
            for _ in range(k):
                i = int(torch.randint(len(models), (1,), generator=self.cpu_gen))
                g_vr = self.grad(i, models[i], xb, inner, tb)[0] - gs[i][0] + g_ens
                acc += g_vr
                inner = self.pgd_step(inner, g_vr, xb, step)
            db = self.pgd_step(db, acc, xb, step)
        return db.detach(), loss
