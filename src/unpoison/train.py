"""The scoring protocol's training loop (paper Sec. 4.1), airbench-style.

Hyperparameters live in :class:`TrainConfig` (one place). The whole training split is moved to the
device once as uint8; each batch is converted, augmented (random crop with 4 px zero padding,
horizontal flip) and normalised on the device with vectorised tensor ops, so there is no DataLoader
and no per-image Python loop. A split larger than the memory budget (``memory_budget``) is streamed
from disk instead (:mod:`unpoison.stream`): same permutation, same batches, same result.
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .accel import Accel
from .data import ImageDataset
from .errors import NonFiniteError, UserError
from .models import create_model
from .stream import BatchSource, ResidentSource, fits, make_source, shard_ranges
from .stream import memory_budget as _memory_budget
from .utils import pick_device, seed_everything

#: a training-time defense: (model, x in [0,1] augmented batch, y) -> batch to train on
TrainDefense = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class TrainConfig:
    """The paper's protocol: SGD 0.1 / momentum 0.9 / wd 5e-4, cosine, batch 128, crop+flip."""

    model: str = "resnet18"
    epochs: int = 60
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    crop_pad: int = 4
    flip: bool = True
    label_smoothing: float = 0.0
    eval_every: int = 1

    @classmethod
    def preset(cls, name: str, **overrides: object) -> TrainConfig:
        """``paper`` (ResNet-18, 60 epochs), ``cpu`` (smallcnn, 15 epochs), ``smoke`` (tinycnn, 3)."""
        presets = {
            "paper": {},
            "cpu": {"model": "smallcnn", "epochs": 15},
            "smoke": {"model": "tinycnn", "epochs": 3, "batch_size": 64},
        }
        if name not in presets:
            raise UserError(f"unknown training preset {name!r}; known: {', '.join(presets)}")
        cfg = cls(**presets[name])  # type: ignore[arg-type]
        for k, v in overrides.items():
            if v is not None:
                setattr(cfg, k, v)
        return cfg

    def check(self) -> TrainConfig:
        """Ranges at the boundary: a negative or infinite learning rate is a one-line error, not a NaN model."""
        for k in ("epochs", "batch_size", "eval_every"):
            if not isinstance(getattr(self, k), numbers.Integral) or getattr(self, k) < 1:
                raise UserError(f"{k} must be an integer >= 1, got {getattr(self, k)}")
        if not isinstance(self.crop_pad, numbers.Integral) or self.crop_pad < 0:
            raise UserError(f"crop_pad must be an integer >= 0, got {self.crop_pad}")
        for k, lo, hi, lo_open in (("lr", 0.0, math.inf, True), ("momentum", 0.0, 1.0, False),
                                   ("weight_decay", 0.0, math.inf, False), ("label_smoothing", 0.0, 1.0, False)):
            v = float(getattr(self, k))
            if not math.isfinite(v) or v < lo or v > hi or (lo_open and v == lo):
                raise UserError(f"{k} must be a finite number {'>' if lo_open else '>='} {lo}"
                                f"{'' if hi == math.inf else f' and <= {hi}'}, got {v}")
        return self


def check_finite_loss(value: float, what: str, epoch: int, hint: str = "--lr", unit: str = "epoch") -> None:
    """Stop a run whose loss went NaN/inf (checked once an epoch on a sum the loop already synced)."""
    if not math.isfinite(value):
        raise NonFiniteError(f"{what} diverged: loss is {value} at {unit} {epoch}; nothing was written "
                             f"(a smaller {hint} may help)")


@dataclass
class TrainResult:
    model: nn.Module
    config: dict[str, object]
    final_acc: float
    best_acc: float
    best_epoch: int
    per_class_acc: list[float]
    history: list[dict[str, float]] = field(default_factory=list)
    train_time_s: float = 0.0
    images_per_s: float = 0.0

    def summary(self) -> dict[str, object]:
        d = {k: v for k, v in self.__dict__.items() if k != "model"}
        return d


def to_device_images(x: np.ndarray, device: torch.device, chunk: int = 8192) -> torch.Tensor:
    """uint8 NHWC numpy (maybe memory-mapped) -> uint8 NCHW tensor on ``device``, in chunks."""
    out = torch.empty((len(x), x.shape[3], x.shape[1], x.shape[2]), dtype=torch.uint8, device=device)
    for i in range(0, len(x), chunk):
        out[i:i + chunk] = torch.from_numpy(np.array(x[i:i + chunk])).to(device).permute(0, 3, 1, 2)  # copy: mmap-safe
    return out


def augment_batch(x: torch.Tensor, pad: int, flip: bool, gen: torch.Generator | None = None) -> torch.Tensor:
    """Random crop (zero padding ``pad``) and horizontal flip of a float NCHW batch, vectorised."""
    n, _, h, w = x.shape
    dev = x.device
    if pad > 0:
        xp = F.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n,), device=dev, generator=gen)
        dx = torch.randint(0, 2 * pad + 1, (n,), device=dev, generator=gen)
        rows = (dy[:, None] + torch.arange(h, device=dev)[None]).view(n, 1, h, 1).expand(-1, x.shape[1], h, w + 2 * pad)
        xp = xp.gather(2, rows)
        cols = (dx[:, None] + torch.arange(w, device=dev)[None]).view(n, 1, 1, w).expand(-1, x.shape[1], h, w)
        x = xp.gather(3, cols)
    if flip:
        m = torch.rand(n, device=dev, generator=gen) < 0.5
        x = torch.where(m[:, None, None, None], x.flip(3), x)
    return x


@torch.no_grad()
def predict(model: nn.Module, x_u8: torch.Tensor | BatchSource, batch_size: int = 512) -> torch.Tensor:
    """Class predictions for a uint8 NCHW tensor already on the model's device (or a :class:`BatchSource`)."""
    model.eval()
    src = x_u8 if isinstance(x_u8, BatchSource) else ResidentSource(x_u8)
    preds = [model(xb.float().div_(255)).argmax(1) for _, xb in src.ranges(shard_ranges(len(src), batch_size))]
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


def accuracy(model: nn.Module, x_u8: torch.Tensor | BatchSource, y: torch.Tensor, num_classes: int,
             batch_size: int = 512) -> tuple[float, list[float]]:
    p = predict(model, x_u8, batch_size)
    correct = (p == y).float()
    per = torch.zeros(num_classes, device=y.device).index_add_(0, y, correct)
    cnt = torch.bincount(y, minlength=num_classes).clamp_min(1)
    return correct.mean().item() * 100, (per / cnt * 100).tolist()


def train_classifier(
    train: ImageDataset,
    test: ImageDataset | None = None,
    config: TrainConfig | None = None,
    seed: int = 0,
    device: str | torch.device = "auto",
    train_defense: TrainDefense | None = None,
    progress: bool = True,
    desc: str = "train",
    accel: Accel | None = None,
    memory_budget: str | int | None = None,
) -> TrainResult:
    """Train ``config.model`` on ``train``'s training split; score on ``test``'s test split.

    ``test`` defaults to ``train`` itself (its own test split). Reported accuracy is the
    last epoch's (the paper's rule); the best epoch is kept for reference. ``accel`` picks bf16
    autocast, channels_last and the evaluation batch (default ``Accel.auto(device, "classifier")``).
    Both splits are kept on the device when they fit ``memory_budget`` together (default: half the
    free memory); otherwise the training split, and the test split if it does not fit alone, stream.
    """
    cfg = config or TrainConfig()
    test = test or train
    if not test.has_test:
        raise UserError("no test split to score on; pass --test", test.source)
    if test.image_shape != train.image_shape or test.num_classes != train.num_classes:
        raise UserError(f"test split {test.image_shape}/{test.num_classes} classes does not match training "
                        f"data {train.image_shape}/{train.num_classes} classes", test.source)
    cfg.check()
    dev = pick_device(device)
    seed_everything(seed)
    gen = torch.Generator(device=dev)
    gen.manual_seed(seed)
    h, w, c = train.image_shape
    model = create_model(cfg.model, train.num_classes, c, max(h, w)).to(dev)
    accel = accel or Accel.auto(dev, "classifier")
    model = model.to(memory_format=accel.memory_format)
    budget = _memory_budget(memory_budget, dev)
    both = fits(int(train.x_train.nbytes) + int(test.x_test.nbytes), budget)  # type: ignore[union-attr]
    x_tr = make_source(train.x_train, dev, stream=not both)
    y_tr = torch.as_tensor(train.y_train, device=dev)
    x_te = make_source(test.x_test, dev, budget)  # type: ignore[arg-type]
    y_te = torch.as_tensor(test.y_test, device=dev)
    n = len(x_tr)
    steps_per_epoch = (n + cfg.batch_size - 1) // cfg.batch_size
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                          nesterov=False)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * steps_per_epoch)
    history: list[dict[str, float]] = []
    best, best_ep, per_class, acc = -1.0, 0, [], 0.0
    t0 = time.perf_counter()
    bar = tqdm(range(cfg.epochs), desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    for ep in bar:
        model.train()
        perm = torch.randperm(n, device=dev, generator=gen)
        tot_loss = torch.zeros((), device=dev)
        tot_correct = torch.zeros((), device=dev)
        for idx, x_b in x_tr.batches(list(perm.split(cfg.batch_size))):
            xb = augment_batch(x_b.float().div_(255), cfg.crop_pad, cfg.flip, gen)
            yb = y_tr[idx]
            if train_defense is not None:
                xb = train_defense(model, xb, yb)
                model.train()
            xb = xb.contiguous(memory_format=accel.memory_format)
            with accel.autocast(dev):
                out = model(xb)
                loss = F.cross_entropy(out, yb, label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot_loss += loss.detach() * len(idx)
            tot_correct += (out.argmax(1) == yb).sum()
        rec = {"epoch": ep + 1, "train_loss": tot_loss.item() / n, "train_acc": tot_correct.item() / n * 100}
        check_finite_loss(rec["train_loss"], f"{desc}: classifier training", ep + 1, "--lr")
        if (ep + 1) % cfg.eval_every == 0 or ep + 1 == cfg.epochs:
            acc, per_class = accuracy(model, x_te, y_te, train.num_classes, accel.infer_batch)
            rec["test_acc"] = acc
            if acc > best:
                best, best_ep = acc, ep + 1
        history.append(rec)
        bar.set_postfix(loss=f"{rec['train_loss']:.3f}", train_acc=f"{rec['train_acc']:.1f}",
                        test_acc=f"{rec.get('test_acc', float('nan')):.1f}")
    elapsed = time.perf_counter() - t0
    x_tr.close()
    x_te.close()
    return TrainResult(model=model, config=asdict(cfg), final_acc=acc, best_acc=best, best_epoch=best_ep,
                       per_class_acc=per_class, history=history, train_time_s=elapsed,
                       images_per_s=n * cfg.epochs / elapsed)
