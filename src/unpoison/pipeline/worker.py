"""A rank of a several-process purify job: ``python -m unpoison.pipeline.worker JOB.json`` (what
:func:`unpoison.pipeline.jobs.launch_purify_job` starts). A module of its own, so that running it as
``__main__`` does not run :mod:`unpoison.pipeline.jobs` twice (the package imports that one)."""

import sys

from .jobs import worker_main

if __name__ == "__main__":  # pragma: no cover - run by the launcher in each rank
    sys.exit(worker_main())
