"""Every D-VAE / VAE / AE hyperparameter, declared once: :class:`DVAEConfig` and its presets.

Each field carries its :class:`~unpoison.params.Param` (range, help) and the methods that read it, so the
purifiers' ``PARAMS`` (the API's keyword arguments, ``unpoison purify --method dvae`` flags and the
benchmark's check) are derived from this one class: every field is reachable the same way everywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from ...models.dvae import EMBEDDINGS, LOSS_FORMS, P_INPUTS
from ...params import Param
from ...presets import PresetTable, register_presets

ALL = ("dvae", "vae", "ae")


def _f(default: Any, help: str, low: float | None = None, high: float | None = None,  # noqa: A002
       low_open: bool = False, choices: tuple[str, ...] | None = None, methods: tuple[str, ...] = ALL) -> Any:
    """A config field with its parameter declaration (default ``None`` there: "the preset's")."""
    prm = Param(type(default), None, help, low, high, low_open, choices)
    return field(default=default, metadata={"param": prm, "methods": methods})


@dataclass
class DVAEConfig:
    """All purification hyperparameters (paper B.2 + release); presets in :data:`PRESETS`."""

    width: int = _f(64, "encoder width w (features 2w at the latent resolution)", 1, 4096)
    width1: int = _f(0, "stage-1 width (0: width); stage 1's p_hat is as clean as its image branch is good",
                     0, 4096, methods=("dvae",))
    latent: int = _f(256, "latent channels of mu / logvar", 1, 65536)
    epochs: int = _f(60, "training epochs per stage", 1, 10**6)
    steps: int = _f(0, "optimizer steps per stage, rounded up to whole epochs; overrides epochs (0: off)", 0, 10**9)
    batch_size: int = _f(128, "training batch size", 1, 2**20)
    lr: float = _f(5e-3, "Adam learning rate (cosine to 0 over all steps of a stage)", 0, low_open=True)
    grad_clip: float = _f(5.0, "gradient norm clip", 0, low_open=True)
    kld_weight: float = _f(0.01, "KLD weight lambda of Eq. 14", 0, low_open=True, methods=("dvae", "vae"))
    # max(KLD, limit) is a floor, so a limit below the rate lambda settles at does nothing: the release raises
    # lambda to 0.5 for limits below 0.99
    kld_weight1: float = _f(0.0, "stage-1 KLD weight lambda (0: kld_weight)", 0, methods=("dvae",))
    kld_limit1: float = _f(1.0, "stage-1 KLD limit (paper 1.0; imagenet 1.5)", 0, methods=("dvae",))
    kld_limit2: float = _f(3.0, "stage-2 KLD limit (paper 3.0)", 0, methods=("dvae",))
    downsample1: int = _f(2, "stage-1 downsampling factor: latent resolution H/downsample1", 1, 1024,
                          methods=("dvae",))
    downsample2: int = _f(2, "stage-2 downsampling factor", 1, 1024, methods=("dvae",))
    p_input: str = _f("class", "what D_p sees besides u_y: class (u_y only), z (paper text), features (release)",
                      choices=P_INPUTS, methods=("dvae",))
    embedding: str = _f("spatial", "u_y: spatial (2w x H/d x W/d per class) or vector (2w, broadcast; release)",
                        choices=EMBEDDINGS, methods=("dvae",))
    embed_std: float = _f(0.0, "initial N(0, std) of u_y; 0 = zeros (the release's nn.Embedding: 1)", 0,
                          methods=("dvae",))
    loss_form: str = _f("paper", "Eq. 14's second term: paper (x - x_hat vs p_hat) or release (clamped sum)",
                        choices=LOSS_FORMS, methods=("dvae",))
    rec_weight: float = _f(1.0, "weight of ||x - x_hat||^2 in Eq. 14 (paper: 1)", methods=("dvae",))
    detach_residual: bool = _f(True, "no gradient from Eq. 14's second term into x_hat", methods=("dvae",))
    p_refit: str = _f("none", "after each stage's training, replace the class-wise D_p(u_y) by the class mean or "
                      "median of x - x_hat(mu) on the training images (p_input=class; none = D_p as trained; "
                      "auto = median unless the self-calibrated poison scan finds the set clean)",
                      choices=("none", "mean", "median", "auto"), methods=("dvae",))
    rate_rule: str = _f("fixed", "fixed: KLD limits as given; channels: limits x C / limit_channels (the same nats "
                        "per pixel value on images of any channel count)", choices=("fixed", "channels"),
                        methods=("dvae", "vae"))
    limit_channels: int = _f(3, "the channel count the KLD limits (and, under width_rule=channels, the widths) are "
                             "stated for (the paper's: 3-channel images)", 1, 1024, methods=("dvae", "vae"))
    width_rule: str = _f("fixed", "fixed: widths and latent as given; channels: width, width1 and latent x "
                         "ceil(sqrt(C / limit_channels)) (a conv layer's parameters grow with width^2, so at least "
                         "the same parameters per pixel value on images of more channels)",
                         choices=("fixed", "channels"), methods=("dvae", "vae"))
    subtract_gate: str = _f("none", "probe: keep a stage's class-wise subtraction only where it does not make the "
                            "images easier for a linear probe (on clean data the subtraction invents a class-wise "
                            "pattern, a shortcut); none: always subtract (the paper)", choices=("none", "probe"),
                            methods=("dvae",))
    p_cap: float = _f(0.0, "> 0: add max(mean(p_hat^2), p_cap) (the release: 0.002); 0 = off", 0, methods=("dvae",))
    skip_stage1: bool = _f(False, "ablation (Table 6): purify with stage 2 only", methods=("dvae",))
    stage2_subtract: bool = _f(True, "ablation (Table 6): false -> x3 = x_hat(x1), no subtraction in stage 2",
                               methods=("dvae",))
    kld_limit: float = _f(1.0, "KLD limit of the rate-constrained VAE", 0, methods=("vae",))
    downsample: int = _f(2, "downsampling factor", 1, 1024, methods=("vae", "ae"))
    bottleneck: int = _f(8, "AE code channels (smaller = stronger bottleneck)", 1, 65536, methods=("ae",))
    infer_batch: int = _f(0, "inference batch (0: 1024 on CUDA, 256 on CPU, fewer for large images)", 0, 2**31)
    compile: str = _f("auto", "torch.compile the conv stacks: auto (CUDA only), yes, no", choices=("auto", "yes", "no"))

    @classmethod
    def preset(cls, name: str = "paper", **overrides: Any) -> DVAEConfig:
        """The named preset (or ``auto``) with ``overrides`` (None = keep the preset's; unknown = error)."""
        table = DVAE_PRESETS.values(name, overrides)
        if overrides and overrides.get("epochs") is not None and overrides.get("steps") is None:
            table["steps"] = 0  # an explicit epoch count wins over a preset's step count
        cfg = cls()
        for k, v in table.items():
            setattr(cfg, k, CONFIG_PARAMS[k].coerce(v, k, "D-VAE"))
        cfg.check()
        return cfg

    def epochs_for(self, n: int) -> int:
        """Epochs per stage for ``n`` training images: ``epochs``, or enough to reach ``steps`` when set."""
        if self.steps <= 0:
            return self.epochs
        return max(1, math.ceil(self.steps / max(1, math.ceil(n / self.batch_size))))

    def limit_for(self, limit: float, channels: int) -> float:
        """A KLD limit as applied to ``channels``-channel images under :attr:`rate_rule`. A latent position at
        x1/d covers ``d*d*C`` pixel values, and a limit was set for ``C = limit_channels`` (the paper's: 3), so
        ``channels`` scales it to the same nats per pixel value (paper limits on 1-channel images: a third)."""
        return limit * channels / self.limit_channels if self.rate_rule == "channels" else limit

    def width_scale(self, channels: int) -> int:
        """The factor :attr:`width_rule` applies to ``width``, ``width1`` and ``latent`` on ``channels``-channel
        images: 1 unless ``channels`` exceeds :attr:`limit_channels`; then ``ceil(sqrt(C / limit_channels))``, the
        smallest whole factor whose square (a conv layer's parameters) is at least the channel ratio."""
        k = 1
        while self.width_rule == "channels" and k * k * self.limit_channels < channels:
            k += 1
        return k

    def widths_for(self, channels: int) -> tuple[int, int, int]:
        """(width, stage-1 width, latent) as built for ``channels``-channel images under :attr:`width_rule`."""
        k = self.width_scale(channels)
        return self.width * k, (self.width1 or self.width) * k, self.latent * k

    def check(self) -> None:
        """Every field against its declared type and range (one-line :class:`UserError`)."""
        for k, prm in CONFIG_PARAMS.items():
            prm.coerce(getattr(self, k), k, "D-VAE")


#: every field's parameter declaration
CONFIG_PARAMS: dict[str, Param] = {f.name: f.metadata["param"] for f in fields(DVAEConfig)}


def method_params(method: str) -> dict[str, Param]:
    """The fields ``method`` (dvae, vae, ae) reads: its ``PARAMS``."""
    return {f.name: f.metadata["param"] for f in fields(DVAEConfig) if method in f.metadata["methods"]}


#: the presets, in one place. ``paper`` keeps the paper's numbers (rates 1.0 / 3.0 at lambda 0.01, D_p as
#: trained). ``cpu``: sized by optimizer steps (700 per stage, rounded up to whole epochs), so 3,000 and 60,000
#: images both get a trained model; stage 1 twice as wide as stage 2, since its p_hat is only as clean as its
#: image branch is good; stage-1 rate 0.5 nat at lambda 0.05 (the paper's 1.0 at 0.01 let half of OPS through
#: the image branch: docs/results/disentangle.md); each stage's class-wise p_hat refitted to the median of the
#: final residual (``p_refit``) unless the poison scan calls the set clean (``auto``: the refit raised every
#: poison's accuracy and cost the clean set about a point). ``thorough``: the best this project measured on a
#: 2-core CPU (about 3x the cpu preset's time). Frontier and per-attack numbers: docs/results/frontier/.
#: ``cpu`` and ``thorough`` were chosen on 1-channel images: their limits and widths are stated for one channel
#: and follow the channel count (KLD limits x C, widths and latent x ceil(sqrt(C)): on RGB x3 and x2), so grey
#: images get exactly the numbers they were chosen with (docs/results/rgb-geometry.md).
_GREY: dict[str, Any] = {"rate_rule": "channels", "width_rule": "channels", "limit_channels": 1}

PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    "imagenet": {"downsample1": 8, "kld_limit1": 1.5, "epochs": 20},
    "cpu": {"width": 8, "width1": 16, "latent": 32, "steps": 700, "batch_size": 64, "kld_limit1": 0.5,
            "kld_weight1": 0.05, "p_refit": "auto", "subtract_gate": "probe", **_GREY},
    "thorough": {"width": 8, "width1": 16, "latent": 32, "steps": 2100, "batch_size": 64, "kld_limit1": 0.5,
                 "kld_weight1": 0.05, "kld_limit2": 1.5, "p_refit": "auto", "subtract_gate": "probe", **_GREY},
}

DVAE_PRESETS = register_presets(PresetTable("dvae", PRESETS, keys=frozenset(CONFIG_PARAMS),
                                            aliases={"smoke": "cpu"}, help="D-VAE / VAE / AE purification",
                                            label="D-VAE"))
