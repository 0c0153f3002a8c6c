"""Concrete dataset formats, one module each; importing this package imports every module in it
(:func:`unpoison._registry.discover`, as for models, attacks and defenses) and each registers its format in
``FORMATS``: a new format is one new module.

Detection does not depend on the import order: ``detect_format`` tries formats by their ``priority``
(specific file names first, generic folder layouts last).
"""

from ..._registry import discover

discover(__name__)
