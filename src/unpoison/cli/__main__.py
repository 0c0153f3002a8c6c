"""``python -m unpoison.cli ARGS``: what ``torchrun ... -m unpoison.cli`` and ``purify --nproc`` run per rank."""

import sys

from . import main

sys.exit(main())
