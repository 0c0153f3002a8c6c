"""Concrete dataset formats; importing this package registers them all (order = detection order)."""

from . import npz, idx  # noqa: F401
