"""Models: classifiers behind one registry (``create_model``), and the purification auto-encoders.

One file per architecture family (timm's layout); the machinery lives in ``_registry``/``_factory``.
Every module of this package is imported here (:func:`unpoison._registry.discover`, as for attacks,
defenses and formats) and registers its classifiers: a new architecture is one new module.
"""

from .._registry import discover
from ._factory import create_model, list_models
from ._registry import MODELS
from .dvae import DVAE, BottleneckAE, RateConstrainedVAE, ae_loss, dvae_loss, kl_divergence, vae_loss

discover(__name__)

__all__ = ["create_model", "list_models", "MODELS", "DVAE", "RateConstrainedVAE", "BottleneckAE", "dvae_loss",
           "vae_loss", "ae_loss", "kl_divergence"]
