"""D-VAE two-stage purification (Algorithm 1), and the VAE / AE reconstruction baselines.

Split by responsibility: :mod:`.config` (every hyperparameter and the presets, declared once), :mod:`.engine`
(the training loop and the batched inference pass), :mod:`.staging` (where each stage's images go: device
tensors or ``.npy`` files by rows), :mod:`.autoencoder` (what the three purifiers share: device, seed,
checkpoints through :class:`unpoison.checkpoints.CheckpointStore`, resident or streamed) and
:mod:`.purifiers` (D-VAE, VAE, AE).
"""

from .autoencoder import GRID_ROWS, AutoencoderPurifier, data_fingerprint
from .config import DVAE_PRESETS, PRESETS, DVAEConfig, method_params
from .engine import _infer, _infer_to, _to_u8, compile_stacks, dvae_accel, train_autoencoder
from .purifiers import AEPurifier, DVAEPurifier, VAEPurifier

__all__ = ["DVAEConfig", "DVAE_PRESETS", "PRESETS", "method_params", "DVAEPurifier", "VAEPurifier", "AEPurifier",
           "AutoencoderPurifier", "train_autoencoder", "dvae_accel", "compile_stacks", "data_fingerprint",
           "GRID_ROWS", "_infer", "_infer_to", "_to_u8"]
