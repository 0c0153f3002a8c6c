"""Tiny generated datasets with an obvious class signal, for tests and the ``smoke`` preset."""

from __future__ import annotations

import numpy as np

from .dataset import ImageDataset


def make_synthetic(n: int = 512, size: int = 16, channels: int = 3, classes: int = 4, seed: int = 0,
                   n_test: int | None = None, signal: int = 60) -> ImageDataset:
    """Each class has a random smooth template; images are template + noise, uint8.

    ``signal`` is the template amplitude in grey levels: large values make the task trivial, which
    is what tests of the training loop want.
    """
    rng = np.random.default_rng(seed)
    n_test = n // 4 if n_test is None else n_test
    coarse = rng.uniform(-1, 1, size=(classes, 4, 4, channels))
    templates = np.kron(coarse, np.ones((1, size // 4 + 1, size // 4 + 1, 1)))[:, :size, :size, :]

    def draw(m: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.arange(m) % classes
        rng.shuffle(y)
        base = rng.uniform(70, 185, size=(m, 1, 1, 1))
        noise = rng.normal(0, 20, size=(m, size, size, channels))
        x = base + signal * templates[y] + noise
        return np.clip(np.rint(x), 0, 255).astype(np.uint8), y.astype(np.int64)

    x_tr, y_tr = draw(n)
    x_te, y_te = draw(n_test)
    return ImageDataset(x_tr, y_tr, x_te, y_te, [f"class{i}" for i in range(classes)],
                        source=f"synthetic:n={n},size={size},channels={channels},classes={classes}",
                        format="npz")
