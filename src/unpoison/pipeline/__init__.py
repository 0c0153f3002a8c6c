"""One library pipeline under every entry point: load, poison or purify, measure, write, report.

:func:`purify_dataset` and :func:`poison_dataset` return result objects (images, stage outputs, ``p_hat``,
measurements, timings, what the manifest records). The ``purify`` / ``poison`` commands, the benchmark's
cells, the demo and the several-process workers all call them; :mod:`.jobs` holds the ``purify`` command as
data (what each rank of a ``--nproc`` job runs) and :mod:`.measure` the one measurement against the clean
images.
"""

from .jobs import purify_in_processes
from .measure import measure_against_clean
from .poison import poison_dataset, write_poison_outputs
from .purify import PurifyResult, purify_dataset

__all__ = ["purify_dataset", "poison_dataset", "PurifyResult", "purify_in_processes",
           "measure_against_clean", "write_poison_outputs"]
