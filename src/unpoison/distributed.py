"""Several processes, one job: joining ``torch.distributed``, the few collectives the loops use, the launcher.

A command started by ``torchrun`` (which sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the
rendezvous address) joins the process group in :func:`init`: NCCL with device ``cuda:LOCAL_RANK``
on GPUs, gloo on the CPU. Collectives time out after ``timeout_s`` (a lost host ends the job with an
error instead of a hang: gloo raises, NCCL's watchdog aborts the rank, ``TORCH_NCCL_ASYNC_ERROR_HANDLING``
being on by default); on one machine ``torchrun`` itself stops the other ranks as soon as one dies.
Outside ``torchrun`` everything here is a no-op on a one-process :data:`SINGLE` context, so library
code calls the same methods either way.

:func:`launch` is ``unpoison purify --nproc N``: it runs ``torch.distributed.run`` (standalone
rendezvous, no restarts) on this machine, shows rank 0's output, keeps the other ranks' in log files,
and turns a failed job into one line (which rank failed, how, and that ``--resume`` continues).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run

from .errors import UserError
from .tensors import pick_device
from .threads import pick_threads

#: default collective timeout (seconds): longer than any wait for a rank still working on its share
DEFAULT_TIMEOUT_S = 900
#: set by :func:`launch` in its workers: a rank that lost a peer exits with :data:`PEER_LOST` quietly,
#: leaving the one line to the launcher (which knows which rank failed first)
LAUNCHED_ENV = "UNPOISON_LAUNCHED"
PEER_LOST = 3


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job (rank 0 of 1 outside ``torchrun``) and the collectives it needs."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes checkpoints, outputs and reports, and shows progress."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def broadcast_(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        """``t`` replaced in place by rank ``src``'s."""
        if self.active:
            dist.broadcast(t, src)
        return t

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` on every rank (small picklable objects: paths, flags, error texts)."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src)
        return box[0]

    def all_reduce_sum_(self, t: torch.Tensor) -> torch.Tensor:
        if self.active:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def any(self, flag: bool, device: torch.device | str = "cpu") -> bool:
        """Whether ``flag`` holds on any rank (so every rank takes the same branch, e.g. to raise)."""
        if not self.active:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def describe(self) -> dict[str, Any]:
        return {"world_size": self.world, "rank": self.rank, "backend": self.backend or None}


SINGLE = DistContext()


def under_launcher() -> bool:
    """Whether this process was started by ``torchrun`` (or anything that sets its environment)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _env_int(name: str) -> int:
    try:
        return int(os.environ.get(name, "0"))
    except ValueError:
        raise UserError(f"bad {name}={os.environ.get(name)!r} in the environment (set by torchrun)") from None


def init(device: str | torch.device = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[DistContext, torch.device]:
    """Join the job ``torchrun`` started (NCCL on GPUs, gloo on CPU); outside one: :data:`SINGLE` and
    :func:`~unpoison.tensors.pick_device` of ``device``."""
    if not under_launcher() or _env_int("WORLD_SIZE") <= 1:
        return SINGLE, pick_device(device)
    rank, world, local = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    spec = str(device)
    if spec not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device {spec}: under torchrun each rank uses its own device; give auto, cuda or cpu")
    use_cuda = spec != "cpu" and torch.cuda.is_available()
    if spec == "cuda" and not use_cuda:
        raise UserError("--device cuda asked for, but no CUDA device is available")
    if use_cuda:
        if local >= torch.cuda.device_count():
            raise UserError(f"local rank {local} has no GPU: this machine has {torch.cuda.device_count()}; "
                            "start at most that many processes per node")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        kw: dict[str, Any] = {"backend": backend, "timeout": datetime.timedelta(seconds=float(timeout_s))}
        if use_cuda:
            kw["device_id"] = dev
        try:
            dist.init_process_group(**kw)
        except (RuntimeError, ValueError, dist.DistError) as e:
            raise UserError(f"cannot join the process group ({backend}): {_first_line(e)}") from None
    return DistContext(rank, world, local, backend), dev


def shutdown(ctx: DistContext) -> None:
    if ctx.active and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0][:300] if lines else type(e).__name__


def is_peer_loss(e: BaseException) -> bool:
    """Whether ``e`` is a collective failing because another rank is gone or the timeout passed."""
    if isinstance(e, dist.DistError):
        return True
    if not isinstance(e, RuntimeError):
        return False
    text = str(e).lower()
    return any(k in text for k in ("connection closed by peer", "connection reset", "broken pipe", "timed out",
                                   "timeout", "gloo", "nccl", "socket", "process group"))


@contextlib.contextmanager
def peer_loss_is_one_line(ctx: DistContext, command: str = "") -> Iterator[None]:
    """Inside a job: a collective that fails because a rank died becomes one line (exit 2), or, under
    :func:`launch`, a quiet exit :data:`PEER_LOST` (the launcher says which rank failed first)."""
    try:
        yield
    except (RuntimeError, dist.DistError) as e:
        if not ctx.active or not is_peer_loss(e):
            raise
        if os.environ.get(LAUNCHED_ENV):
            sys.stderr.flush()
            os._exit(PEER_LOST)  # skip the teardown collectives, which would wait for the dead rank
        raise UserError(f"rank {ctx.rank} lost contact with the other ranks ({_first_line(e)}); the job stopped. "
                        "Run the same command with --resume to continue from the last checkpoint") from None


# --- the launcher ---------------------------------------------------------------------------------------
def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def _last_line(path: str | Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            lines = [ln.strip() for ln in f.read().decode("utf-8", "replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


def _worker_logs(log_dir: Path, local_rank: int) -> list[Path]:
    return sorted(log_dir.rglob(f"{local_rank}/stderr.log"))


def launch(nproc: int, argv: list[str], command: str = "unpoison", monitor_interval: float = 0.5,
           module: str = "unpoison") -> int:
    """Run ``python -m MODULE ARGV`` as ``nproc`` ranks on this machine with ``torch.distributed.run`` (the
    purify workers: ``unpoison.pipeline.worker JOB.json``).

    Rank 0's output goes to the terminal; the others' to log files (shown only to explain a failure).
    Returns 0, or 2 after one line on stderr saying which rank failed and how."""
    if nproc < 1:
        raise UserError(f"--nproc must be >= 1, got {nproc}")
    if under_launcher():
        raise UserError("--nproc inside a torchrun job: start the command one way, not both")
    log_dir = Path(tempfile.mkdtemp(prefix="unpoison-ranks-"))
    redirects = ",".join(f"{r}:3" for r in range(1, nproc)) or "0"
    targs = parse_args(["--standalone", "--nnodes", "1", "--nproc-per-node", str(nproc), "--max-restarts", "0",
                        "--monitor-interval", str(monitor_interval), "--log-dir", str(log_dir),
                        "--redirects", redirects, "-m", module])
    targs.training_script_args = list(argv)  # not parsed by torchrun's parser (it would take --nproc as its own)
    quiet = logging.getLogger("torch.distributed")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # the agent's multi-line reports; the failure is said in one line below
    old_env = os.environ.get(LAUNCHED_ENV)
    os.environ[LAUNCHED_ENV] = "1"
    # each rank its share of the cores free now (unpoison.threads), unless the user set OMP_NUM_THREADS
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, pick_threads() // nproc)))
    try:
        run(targs)
        return 0
    except ChildFailedError as e:
        line = _failure_line(e.failures, log_dir, nproc)
        if line:  # None: rank 0 failed and has said why on this terminal already
            print(f"{command}: error: {line}", file=sys.stderr)
        return 2
    finally:
        quiet.setLevel(level)
        if old_env is None:
            os.environ.pop(LAUNCHED_ENV, None)
        else:
            os.environ[LAUNCHED_ENV] = old_env

        shutil.rmtree(log_dir, ignore_errors=True)


def _failure_line(failures: dict[int, Any], log_dir: Path, nproc: int) -> str | None:
    """The first real failure among the ranks (not those stopped by the launcher or that lost a peer)."""
    resume = "run the same command with --resume to continue from the last checkpoint"
    fails = sorted(failures.values(), key=lambda f: (f.timestamp, f.local_rank))
    real = [f for f in fails if f.exitcode not in (PEER_LOST, -signal.SIGTERM)] or fails
    f = real[0]
    who = f"rank {f.local_rank} of {nproc} (pid {f.pid})"
    if f.exitcode < 0:
        return f"{who} was killed by {_signal_name(f.exitcode)}; the other ranks were stopped; {resume}"
    if f.local_rank == 0 and f.exitcode == 2:
        return None
    said = ""
    if f.local_rank != 0:
        for log in _worker_logs(log_dir, f.local_rank):
            said = _last_line(log) or said
    if f.exitcode == 2 and said:
        return f"rank {f.local_rank}: {said.split(': error: ', 1)[-1]}"
    tail = f": {said}" if said else ""
    return f"{who} exited with code {f.exitcode}{tail}; the other ranks were stopped; {resume}"
