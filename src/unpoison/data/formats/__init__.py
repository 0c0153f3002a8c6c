"""Concrete dataset formats; importing this package registers them all.

Detection does not depend on this import order: ``detect_format`` tries formats by their
``priority`` (specific file names first, generic folder layouts last).
"""

from . import cifar, idx, imagefolder, imagenet, npy, npz, svhn  # noqa: F401
