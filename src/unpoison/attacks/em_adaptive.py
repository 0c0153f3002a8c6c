"""em-adaptive: error-minimizing noise crafted *through* the D-VAE purifier (an adaptive attack on D-VAE).

Rationale (issue 25): every defense since 2023 is asked what happens when the attacker knows it; ECLIPSE
(ESORICS'24) answers with an adaptive attack, and none had been run against D-VAE. This one is EM (Huang et
al., ICLR 2021, sample-wise, l_inf 8/255, the same budget and min-min) with the purifier inside the loop:
the surrogate is trained on the *purified* poisoned images, and each noise step lowers the surrogate's
cross-entropy on the purified image, the gradient taken through the purification (BPDA, Athalye et al.,
ICML 2018, for what is not differentiable):

    x0 = q(x + delta)                      q: clamp to [0, 1] and round to whole grey levels (straight-through)
    x1 = q(x0 - p_hat1(x0))                stage 1's subtraction (a class-wise p_hat: a constant per class)
    x2 = q(x1 - p_hat2(x1))                stage 2's subtraction (each skipped where the fitted D-VAE's
                                           subtraction gate refused it, as the defense then does)
    x3 = q(x_hat2(x2))                     stage 2's reconstruction: the image the victim trains on

``plain_weight`` > 0 adds that much of EM's own loss on the unpurified image (to both steps), so one poison
can aim at a victim with and without the defense. The D-VAE is the attacker's own: a fresh two-stage D-VAE
trained (``make_purifier("dvae")``, the defense's code) on the current poisoned images, refitted every
``refresh`` rounds as the noise changes, and kept in the checkpoint with the rest of the round's state, so a
resumed run continues exactly.

**The attacker's knowledge**: the defense's code and architecture, its preset (``dvae_preset``: widths,
latent size, rates, stage-1 rule, p_hat refit) and hence its rate; *not* the defender's seed (the attacker's
D-VAEs are seeded from the attack's seed) nor the defender's training length (``dvae_steps``: fewer steps
than the preset's, to fit the refits into the budget). The ``cpu`` preset crafts 10,000 Fashion-MNIST images
on two cores within an hour (D-VAE ``cpu`` widths, 300 steps a stage, a refit every 4 rounds).
"""

from __future__ import annotations

import pkgutil
import time
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..defenses import dvae as dvae_defense
from ..defenses import make_purifier
from ..defenses.dvae import DVAE_PRESETS, DVAEPurifier
from ..errors import UserError
from ..models import dvae as dvae_models
from ..params import Param
from ..scan import scan
from ._parametrised import st_levels
from .base import quantize, register_attack
from .em import EM
from .em_smooth import EMSmooth

_STAGES = ("stage1", "stage2")


@register_attack("em-adaptive", "error-minimizing noise crafted through a D-VAE refitted on the poison (l_inf 8/255)")
class EMAdaptive(EMSmooth):
    norm = "linf"
    norms = ("linf",)
    default_eps: ClassVar[dict[str, float]] = {"linf": 8 / 255}
    SMOKE: ClassVar[dict[str, Any]] = {**EM.SMOKE, "dvae_width": 4, "dvae_steps": 1}
    PARAMS: ClassVar[dict[str, Param]] = {
        **EMSmooth.PARAMS,
        "grid": Param(int, 1, "cell side in pixels of the grid the noise is given on, bilinearly upsampled (1: one "
                              "value a pixel, EM's noise; 4: em-smooth's)", low=1),
        "dvae_preset": Param(str, "paper", "the D-VAE preset the attacker assumes (architecture and rate)"),
        "dvae_steps": Param(int, 4000, "optimizer steps a stage of each attacker's D-VAE (0: the preset's own)", low=0),
        "dvae_width": Param(int, 0, "D-VAE width of both stages (0: the preset's)", low=0),
        "refresh": Param(int, 10, "rounds between refits of the attacker's D-VAE on the current poison", low=1),
        "plain_weight": Param(float, 0.0, "weight of EM's loss on the unpurified image beside the purified one's",
                              low=0),
    }
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "paper": {},
        "cpu": {**EM.PRESETS["cpu"], "rounds": 15, "pgd_steps": 8, "step_frac": 0.25, "dvae_preset": "cpu",
                "dvae_steps": 300, "refresh": 3},
    }
    RESUMABLE: ClassVar[frozenset[str]] = frozenset({"rounds", "stop_acc"})

    @classmethod
    def code_modules(cls) -> list[str]:
        """EM's, plus the D-VAE's (network, training, purification, and the scan its ``p_refit=auto`` runs): the
        purifier is part of how this poison is made."""
        dv = dvae_defense
        mods = [dvae_models.__name__, dv.__name__, scan.__module__]
        mods += [f"{dv.__name__}.{m.name}" for m in sorted(pkgutil.iter_modules(dv.__path__), key=lambda m: m.name)]
        return list(dict.fromkeys(super().code_modules() + mods))

    def check_params(self) -> None:
        super().check_params()
        DVAE_PRESETS.resolve(self.params["dvae_preset"], "cpu")  # an unknown preset fails here, not after a round

    # --- the attacker's D-VAE ------------------------------------------------------------------------
    def new_purifier(self, fit: int) -> DVAEPurifier:
        """An unfitted D-VAE purifier of the assumed preset, seeded from the attack's seed and the refit count."""
        over: dict[str, Any] = {}
        if self.params["dvae_steps"]:
            over["steps"] = self.params["dvae_steps"]
        if self.params["dvae_width"]:
            over.update(width=self.params["dvae_width"], width1=self.params["dvae_width"])
        pur = make_purifier("dvae", preset=self.params["dvae_preset"], device=self.device_,
                            seed=self.seed * 1009 + fit + 1, progress=self.progress, **over)
        assert isinstance(pur, DVAEPurifier)
        return pur

    def before_rounds(self) -> None:
        _, _, h, w = self.x.shape
        cfg = self.new_purifier(0).config
        m = max(cfg.downsample2, 1 if cfg.skip_stage1 else cfg.downsample1)
        #: bottom / right padding that makes the images fit the D-VAE's downsampling (edge values)
        self.pad_ = (-h % m, -w % m)
        self.subtract2_ = cfg.stage2_subtract
        #: the fitted D-VAE's subtraction-gate decisions (``subtract_gate``): the attacker's purification skips
        #: what the defense's would skip
        self.gate_: dict[str, bool] = {}
        self.dvae_: dict[str, nn.Module] = {}
        self.dvae_round_ = -1
        self.fits_ = 0
        self.round_ = 0
        self.dvae_info_: list[dict[str, Any]] = []

    def setup(self, x: np.ndarray, y: np.ndarray, num_classes: int) -> None:
        super().setup(x, y, num_classes)
        self.x_u8, self.y_np = x, y

    def refresh(self, theta: torch.Tensor) -> None:
        """Refit the attacker's D-VAE on the current poison when none is fitted or ``refresh`` rounds have passed."""
        if self.dvae_ and self.round_ - self.dvae_round_ < self.params["refresh"]:
            return
        t0 = time.perf_counter()
        x_p = quantize(self.x_u8, self.expand_all(theta), "linf", self.eps_)
        ph, pw = self.pad_
        if ph or pw:
            x_p = np.pad(x_p, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")
        pur = self.new_purifier(self.fits_)
        pur.fit(x_p, self.y_np)
        #: the last fitted purifier (its ``purify`` is what :meth:`purify` differentiates)
        self.purifier_ = pur
        self.gate_ = dict(getattr(pur, "subtract_", {}))
        self.set_models({k: pur.models_[k] for k in _STAGES if k in pur.models_})
        self.dvae_round_, self.fits_ = self.round_, self.fits_ + 1
        losses = {k: round(h[-1]["psnr"], 2) for k, h in pur.history_.items() if h}
        self.dvae_info_.append({"round": self.round_, "seconds": round(time.perf_counter() - t0, 1),
                                "train_psnr_db": losses,
                                "p_refit": dict(getattr(pur, "p_refit_info_", {})).get("applied")})

    def set_models(self, models: dict[str, nn.Module]) -> None:
        for m in models.values():
            m.eval()
            m.requires_grad_(False)
        self.dvae_ = models

    def purify(self, xp: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The purified images of the poisoned ``xp`` (float NCHW in [0, 1]), differentiable in ``xp`` (BPDA)."""
        ph, pw = self.pad_
        x = F.pad(xp, (0, pw, 0, ph), mode="replicate") if ph or pw else xp
        x = st_levels(x)
        for stage in _STAGES:
            m = self.dvae_.get(stage)
            if m is None or (stage == "stage2" and not self.subtract2_) or not self.gate_.get(stage, True):
                continue
            p = m.perturbation(y) if m.p_input == "class" else m(x, y)["p_hat"]
            x = st_levels(x - p)
        x = st_levels(self.dvae_["stage2"].reconstruct(x))
        return x[..., :xp.shape[-2], :xp.shape[-1]]

    # --- the min-min through the purifier ------------------------------------------------------------
    def seen(self, xp: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return self.purify(xp, self.y[idx])

    def loss_on(self, model: nn.Module, xp: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        loss = super().loss_on(model, xp, idx)
        if self.params["plain_weight"] > 0:
            loss = loss + self.params["plain_weight"] * F.cross_entropy(model(self.view(xp)), self.y[idx])
        return loss

    def train_loss(self, model: nn.Module, idx: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        self.refresh(theta)
        return super().train_loss(model, idx, theta)

    def minimize_noise(self, model: nn.Module, theta: torch.Tensor) -> torch.Tensor:
        self.refresh(theta)
        theta = super().minimize_noise(model, theta)
        self.round_ += 1
        return theta

    def bar_extra(self) -> dict[str, object]:
        return {"dvae_fits": self.fits_}

    def after_rounds(self, theta: torch.Tensor) -> None:
        super().after_rounds(theta)
        acc, loss = self._eval(self.surrogate_, torch.zeros_like(theta), None)  # the clean images, purified
        self.info_.update({"surrogate_loss_purified_clean": loss, "surrogate_acc_purified_clean": acc})
        self.info_.update({"dvae_fits": self.dvae_info_, "dvae_preset": self.params["dvae_preset"],
                           "knowledge": "D-VAE code, architecture, preset and rate; not the defender's seed"})

    # --- checkpoints: the attacker's D-VAE travels with the round's state ------------------------------
    def save_ckpt(self, state: dict[str, Any]) -> None:
        dv = {k: m.state_dict() for k, m in self.dvae_.items()}
        super().save_ckpt({**state, "dvae": dv, "dvae_round": self.dvae_round_, "dvae_fits": self.fits_,
                           "dvae_gate": self.gate_})

    def load_ckpt(self) -> dict[str, Any] | None:
        state = super().load_ckpt()
        if state is None:
            return None
        if "dvae" not in state:
            raise UserError("checkpoint has no D-VAE state; remove it or run without --resume")
        pur = self.new_purifier(int(state["dvae_fits"]) - 1)
        pur.num_classes_ = self.num_classes
        _, c, h, w = self.x.shape
        hw = (h + self.pad_[0], w + self.pad_[1])
        models = {}
        for k, sd in state["dvae"].items():
            m = pur._make(1 if k == "stage1" else 2, c, hw)().to(self.device_)
            m.load_state_dict(sd)
            models[k] = m
        self.set_models(models)
        self.gate_ = {str(k): bool(v) for k, v in state.get("dvae_gate", {}).items()}
        self.round_ = int(state["round"])
        self.dvae_round_, self.fits_ = int(state["dvae_round"]), int(state["dvae_fits"])
        return state
