"""Every torch RNG state a training loop draws from, captured for a checkpoint and restored on resume.

A resumed run continues exactly only if it starts from the same random state as the uninterrupted
run had at that point: the loop's explicit :class:`torch.Generator` objects (data order, noise,
sampling) and torch's global CPU and CUDA generators (model initialisation, any op without an explicit
generator). The loops checkpointed here draw nothing from numpy's or Python's global RNGs (their
numpy sampling uses local ``default_rng`` objects), so those are not saved.

The state is a dict of tensors, strings and lists, so it round-trips through
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .errors import UserError


def capture(generators: Mapping[str, torch.Generator]) -> dict[str, Any]:
    """The global CPU state, CUDA's (one per device, once CUDA is initialised) and each named generator."""
    state: dict[str, Any] = {
        "cpu": torch.get_rng_state(),
        "generators": {k: g.get_state() for k, g in generators.items()},
        "devices": {k: g.device.type for k, g in generators.items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore(state: Mapping[str, Any], generators: Mapping[str, torch.Generator],
            source: str | Path | None = None) -> None:
    """Put every state of :func:`capture` back; a checkpoint from another device type is a :class:`UserError`."""
    saved = state.get("generators", {})
    devices = state.get("devices", {})
    for k, g in generators.items():
        if k not in saved:
            raise UserError(f"checkpoint has no state for random generator {k!r}; it is not from this run", source)
        if devices.get(k, g.device.type) != g.device.type:
            raise UserError(f"checkpoint was written on {devices[k]}, this run is on {g.device.type}; resume on "
                            f"the same kind of device (or drop --resume)", source)
    torch.set_rng_state(state["cpu"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        for i, s in enumerate(cuda[:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)
    for k, g in generators.items():
        g.set_state(saved[k])
