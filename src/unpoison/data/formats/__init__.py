"""Concrete dataset formats; importing this package registers them all (order = detection order)."""

from . import idx, npz  # noqa: F401
