"""``python -m unpoison ARGS`` (and ``torchrun --nproc-per-node N -m unpoison purify ...``): the CLI."""

import sys

from .cli import main

sys.exit(main())
