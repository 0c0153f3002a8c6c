"""Models: classifiers behind one registry (``create_model``), and the purification auto-encoders.

One file per architecture family (timm's layout); the machinery lives in ``_registry``/``_factory``.
"""

from . import densenet, mobilenet, resnet, small_cnn, vgg  # noqa: F401  (register)
from ._factory import create_model, list_models
from ._registry import MODELS
from .dvae import DVAE, BottleneckAE, RateConstrainedVAE, ae_loss, dvae_loss, kl_divergence, vae_loss

__all__ = ["create_model", "list_models", "MODELS", "DVAE", "RateConstrainedVAE", "BottleneckAE", "dvae_loss",
           "vae_loss", "ae_loss", "kl_divergence"]
