"""The purification auto-encoders: D-VAE (Eq. 14), the rate-constrained VAE (Eq. 3) and a plain AE.

All three share one encoder: the first 7 conv layers of a CIFAR ResNet-18 (conv3x3 + BN + ReLU, two
BasicBlocks ``w -> w``, one BasicBlock ``w -> 2w`` with stride 2), plus ``log2(downsample) - 1``
extra stride-2 BasicBlocks ``2w -> 2w`` for stronger downsampling (the ImageNet preset's x0.125).
Decoders are 4 transposed-conv layers with InstanceNorm (docs/design.md, "D-VAE"), with one extra stride-2
transposed conv per extra downsampling stage. Any channel count and any image size divisible by
``downsample`` works. Inputs are float images in [0, 1], NCHW.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock

from ..errors import UserError


def check_geometry(height: int, width: int, downsample: int) -> None:
    """Raise :class:`UserError` when an image size cannot go through ``downsample`` and back."""
    if downsample < 2 or downsample & (downsample - 1):
        raise UserError(f"downsampling factor must be a power of two >= 2, got {downsample}")
    if height < downsample or width < downsample or height % downsample or width % downsample:
        raise UserError(f"images of {height}x{width} are too small for or not divisible by the "
                        f"x1/{downsample} downsampling of the auto-encoder")


def _down(cin: int, cout: int) -> BasicBlock:
    shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=2, bias=False), nn.BatchNorm2d(cout))
    return BasicBlock(cin, cout, stride=2, downsample=shortcut)


class Encoder(nn.Module):
    """ResNet-18's first 7 conv layers (+ extra stride-2 blocks): ``C x H x W -> 2w x H/d x W/d``."""

    def __init__(self, in_channels: int, width: int, downsample: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            BasicBlock(width, width), BasicBlock(width, width), _down(width, 2 * width),
        ]
        layers += [_down(2 * width, 2 * width) for _ in range(int(math.log2(downsample)) - 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Decoder(nn.Module):
    """ConvT(2w->w,k4,s2) [+ ConvT(w->w,k4,s2) per extra stage] + ConvT(w->w,k3) + IN + ReLU
    + ConvT(w->w/2,k3) + IN + ReLU + ConvT(w/2->C,k3); ``sigmoid`` for images, none for perturbations."""

    def __init__(self, out_channels: int, width: int, downsample: int = 2, sigmoid: bool = True) -> None:
        super().__init__()
        half = max(width // 2, 1)
        layers: list[nn.Module] = [nn.ConvTranspose2d(2 * width, width, 4, 2, 1)]
        layers += [nn.ConvTranspose2d(width, width, 4, 2, 1) for _ in range(int(math.log2(downsample)) - 1)]
        layers += [
            nn.ConvTranspose2d(width, width, 3, 1, 1), nn.InstanceNorm2d(width), nn.ReLU(inplace=True),
            nn.ConvTranspose2d(width, half, 3, 1, 1), nn.InstanceNorm2d(half), nn.ReLU(inplace=True),
            nn.ConvTranspose2d(half, out_channels, 3, 1, 1),
        ]
        if sigmoid:
            layers.append(nn.Sigmoid())
        self.net = nn.Sequential(*layers)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma) || N(0, I)) summed over latent channels, averaged over batch and positions."""
    kld = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp())
    return kld.sum(1).mean()


def rate_term(kld: torch.Tensor, weight: float, limit: float) -> torch.Tensor:
    """``weight * max(KLD, limit)``: no gradient (and no pressure) while the rate is below ``limit``."""
    return weight * torch.clamp(kld, min=limit)


class _VariationalBase(nn.Module):
    def __init__(self, in_channels: int, image_size: tuple[int, int] | int, width: int, latent: int,
                 downsample: int) -> None:
        super().__init__()
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        check_geometry(h, w, downsample)
        self.in_channels, self.image_size, self.width, self.latent, self.downsample = (
            in_channels, (h, w), width, latent, downsample)
        self.encoder = Encoder(in_channels, width, downsample)
        self.to_mu = nn.Conv2d(2 * width, latent, 1)
        self.to_logvar = nn.Conv2d(2 * width, latent, 1)
        self.from_z = nn.Conv2d(latent, 2 * width, 1)
        self.decoder = Decoder(in_channels, width, downsample, sigmoid=True)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x)
        return self.to_mu(h), self.to_logvar(h)

    @staticmethod
    def sample(mu: torch.Tensor, logvar: torch.Tensor, sample: bool,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterised sample while training; ``z = mu`` at inference (the paper's rule)."""
        if not sample:
            return mu
        eps = torch.randn(mu.shape, device=mu.device, dtype=mu.dtype, generator=generator)
        return mu + eps * torch.exp(0.5 * logvar)


class RateConstrainedVAE(_VariationalBase):
    """Eq. 3: one encoder, one image decoder; the rate limit is applied in the loss."""

    def forward(self, x: torch.Tensor, sample: bool = False,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        mu, logvar = self.encode(x)
        z = self.sample(mu, logvar, sample, generator)
        return {"x_hat": self.decoder(self.from_z(z)), "mu": mu, "logvar": logvar}


#: what the perturbation decoder D_p sees besides the class embedding u_y
P_INPUTS = ("z", "features", "class")
#: shape of the class embedding u_y
EMBEDDINGS = ("spatial", "vector")


class DVAE(_VariationalBase):
    """D-VAE (Fig. 1): ``x_hat = D_c(z)``, ``p_hat = D_p(u_y + h)`` with a class-wise embedding ``u_y``.

    ``p_input`` picks ``h``: ``"z"`` the (sampled, rate-limited) latent mapped back to 2w channels
    (the paper's text, ``u_y + z``); ``"features"`` the encoder's features *before* the mu/logvar
    bottleneck (the authors' release: ``Embedding + stem_out``); ``"class"`` nothing (``D_p(u_y)``,
    the release's ``sample_wise=False``). ``embedding``: ``"spatial"`` one 2w x H/d x W/d map per class,
    ``"vector"`` one 2w vector per class broadcast over positions (the release's default).
    ``embed_std``: initial N(0, std) of ``u_y`` (0: zeros; the release's ``nn.Embedding`` uses 1).
    """

    def __init__(self, in_channels: int, image_size: tuple[int, int] | int, num_classes: int, width: int = 64,
                 latent: int = 256, downsample: int = 2, p_input: str = "class", embedding: str = "spatial",
                 embed_std: float = 0.0) -> None:
        super().__init__(in_channels, image_size, width, latent, downsample)
        if num_classes < 2:
            raise UserError(f"D-VAE needs at least two classes, got {num_classes}")
        if p_input not in P_INPUTS:
            raise UserError(f"D-VAE p_input must be one of {', '.join(P_INPUTS)}, got {p_input!r}")
        if embedding not in EMBEDDINGS:
            raise UserError(f"D-VAE embedding must be one of {', '.join(EMBEDDINGS)}, got {embedding!r}")
        self.num_classes, self.p_input, self.embedding = num_classes, p_input, embedding
        h, w = self.image_size
        shape = (num_classes, 2 * width, h // downsample, w // downsample) if embedding == "spatial" else (
            num_classes, 2 * width, 1, 1)
        self.class_embedding = nn.Parameter(torch.randn(shape) * embed_std if embed_std > 0 else torch.zeros(shape))
        self.perturbation_decoder = Decoder(in_channels, width, downsample, sigmoid=False)

    def class_perturbations(self) -> torch.Tensor:
        """``D_p(u_y)`` of every class, ``num_classes x C x H x W``: with ``p_input="class"`` the estimate
        depends on the label only (InstanceNorm is per sample), so a batch needs one decoder pass per class,
        not per image (measured: docs/results/purify_speed.md)."""
        h, w = self.image_size
        u = self.class_embedding.expand(-1, -1, h // self.downsample, w // self.downsample)
        return self.perturbation_decoder(u)

    def perturbation(self, y: torch.Tensor, feats: torch.Tensor | None = None,
                     h: torch.Tensor | None = None) -> torch.Tensor:
        """``p_hat`` of labels ``y`` (``feats``: encoder features, ``h``: ``from_z(z)``, as ``p_input`` needs)."""
        if self.p_input == "class":
            if self.num_classes <= len(y):  # per class, then gathered (the same values, fewer passes)
                return self.class_perturbations()[y]
            return self.perturbation_decoder(self.class_embedding[y].expand(
                -1, -1, self.image_size[0] // self.downsample, self.image_size[1] // self.downsample))
        base = h if self.p_input == "z" else feats
        if base is None:
            raise ValueError(f"p_input={self.p_input!r} needs the encoder's output")
        return self.perturbation_decoder(base + self.class_embedding[y])

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """``x_hat = D_c(from_z(mu))`` alone (inference's last step needs no ``p_hat`` nor ``logvar``)."""
        return self.decoder(self.from_z(self.to_mu(self.encoder(x))))

    def forward(self, x: torch.Tensor, y: torch.Tensor, sample: bool = False,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        feats = self.encoder(x)
        mu, logvar = self.to_mu(feats), self.to_logvar(feats)
        z = self.sample(mu, logvar, sample, generator)
        h = self.from_z(z)
        return {"x_hat": self.decoder(h), "p_hat": self.perturbation(y, feats, h), "mu": mu, "logvar": logvar}


#: forms of Eq. 14's second term
LOSS_FORMS = ("paper", "release")


def dvae_loss(x: torch.Tensor, out: dict[str, torch.Tensor], kld_weight: float = 0.01,
              kld_limit: float = 1.0, form: str = "paper",
              p_cap: float | None = None, rec_weight: float = 1.0,
              detach_residual: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Eq. 14: ``||x - x_hat||^2 + ||(x - x_hat) - p_hat||^2 + lambda max(KLD, limit)``.

    Squared norms are means over pixels (``F.mse_loss``) so that ``lambda = 0.01`` and a per-position
    KLD limit balance as in the release. ``form="paper"``: the second term as written (unclamped);
    ``"release"``: ``||clamp(x_hat + p_hat, 0, 1) - x||^2``. ``p_cap``: add the release's
    ``max(mean(p_hat^2), p_cap)``, which shrinks ``p_hat`` once its energy exceeds what a bounded
    poison can have (the release uses 0.002 after its 10th epoch). ``rec_weight`` scales the first
    term (1 in the paper; 0 leaves only ``x ~ x_hat + p_hat``). ``detach_residual``: no gradient from
    the second term into ``x_hat`` (the image branch is then a plain rate-constrained VAE, and ``p_hat``
    fits its residual instead of pulling ``x_hat`` toward ``x - p_hat``). Returns the total and its parts.
    """
    x_hat, p_hat = out["x_hat"].float(), out["p_hat"].float()
    rec = F.mse_loss(x_hat, x)
    xh = x_hat.detach() if detach_residual else x_hat
    if form == "paper":
        pert = F.mse_loss(x - xh, p_hat)
    elif form == "release":
        pert = F.mse_loss((xh + p_hat).clamp(0, 1), x)
    else:
        raise UserError(f"D-VAE loss form must be one of {', '.join(LOSS_FORMS)}, got {form!r}")
    kld = kl_divergence(out["mu"].float(), out["logvar"].float())
    loss = rec_weight * rec + pert + rate_term(kld, kld_weight, kld_limit)
    p_energy = p_hat.pow(2).mean()
    if p_cap is not None:
        loss = loss + torch.clamp(p_energy, min=p_cap)
    return loss, {"rec": rec.detach(), "pert": pert.detach(), "kld": kld.detach(), "p_energy": p_energy.detach()}


def vae_loss(x: torch.Tensor, out: dict[str, torch.Tensor], kld_weight: float = 0.01,
             kld_limit: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Eq. 3: ``||x - x_hat||^2 + lambda max(KLD, limit)`` (means over pixels, as :func:`dvae_loss`)."""
    rec = F.mse_loss(out["x_hat"].float(), x)
    kld = kl_divergence(out["mu"].float(), out["logvar"].float())
    return rec + rate_term(kld, kld_weight, kld_limit), {"rec": rec.detach(), "kld": kld.detach()}


class BottleneckAE(nn.Module):
    """Appendix E: a non-variational auto-encoder whose only bottleneck is the feature width.

    Same encoder/decoder layout as the VAEs; the code between them has ``bottleneck`` channels
    (1x1 convs in and out), so smaller ``bottleneck`` means lower reconstruction quality.
    """

    def __init__(self, in_channels: int, image_size: tuple[int, int] | int, width: int = 64, bottleneck: int = 8,
                 downsample: int = 2) -> None:
        super().__init__()
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        check_geometry(h, w, downsample)
        if bottleneck < 1:
            raise UserError(f"AE bottleneck width must be >= 1, got {bottleneck}")
        self.encoder = Encoder(in_channels, width, downsample)
        self.to_code = nn.Conv2d(2 * width, bottleneck, 1)
        self.from_code = nn.Conv2d(bottleneck, 2 * width, 1)
        self.decoder = Decoder(in_channels, width, downsample, sigmoid=True)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"x_hat": self.decoder(self.from_code(self.to_code(self.encoder(x))))}


def ae_loss(x: torch.Tensor, out: dict[str, torch.Tensor], **_: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    rec = F.mse_loss(out["x_hat"].float(), x)
    return rec, {"rec": rec.detach()}
