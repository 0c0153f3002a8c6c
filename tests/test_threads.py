"""The intra-op thread count comes from the cores actually free (unpoison.threads), checked against
hand-computed cases with the readings injected; the user's --threads and OMP_NUM_THREADS come first."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import unpoison.cli as cli
from unpoison import threads
from unpoison.errors import UserError


@pytest.mark.parametrize(
    "cores,machine,load,running,expected",
    [
        (2, 2, 0.0, 1, 2),     # idle machine: only this process runs -> both cores
        (2, 2, 2.0, 3, 1),     # make demo's case: two one-thread jobs on two cores -> 1 (never 0)
        (2, 2, 1.0, 2, 1),     # one job beside us -> the other core
        (2, 2, 0.1, 2, 1),     # a job that just started (load average still low): the running count sees it
        (2, 2, 1.2, 1, 1),     # jobs that just ended (running count low): the load average still counts them
        (8, 8, 2.6, 1, 5),     # 2.6 busy rounds to 3
        (4, 4, 1.5, 1, 2),     # 1.5 rounds up to 2
        (4, 4, 1.49, 1, 3),    # 1.49 rounds down to 1
        (4, 16, 8.0, 1, 2),    # affinity 4 of 16 cores, load 8 machine-wide: our share of it is 2
        (4, 4, None, None, 4),  # no readings (not Linux): all of our cores
        (1, 64, 50.0, 40, 1),  # a busy host, one core for us: 1
        (16, 16, 0.0, 1, 16),
    ],
)
def test_free_threads_hand_computed(cores: int, machine: int, load: float | None, running: int | None,
                                    expected: int) -> None:
    assert threads.free_threads(cores, machine, load, running) == expected


def _readings(monkeypatch: pytest.MonkeyPatch, cores: int, load: float, running: int) -> None:
    monkeypatch.setattr(threads, "affinity_cores", lambda: cores)
    monkeypatch.setattr(threads, "load_1min", lambda: load)
    monkeypatch.setattr(threads, "running_now", lambda stat="/proc/stat": running)
    monkeypatch.setattr(threads.os, "cpu_count", lambda: cores)


def test_explicit_choices_come_first(monkeypatch: pytest.MonkeyPatch) -> None:
    _readings(monkeypatch, cores=2, load=2.0, running=3)  # the rule alone would say 1
    assert threads.pick_threads(env={}) == 1
    assert threads.pick_threads(2, env={"OMP_NUM_THREADS": "1"}) == 2  # --threads first
    assert threads.pick_threads(env={"OMP_NUM_THREADS": "2"}) == 2
    assert threads.pick_threads(env={"OMP_NUM_THREADS": "3,1"}) == 3  # OpenMP's nested syntax: the outer count
    for junk in ("", "0", "-1", "many"):  # not a count: the rule decides
        assert threads.pick_threads(env={"OMP_NUM_THREADS": junk}) == 1
    with pytest.raises(UserError, match="--threads must be >= 1"):
        threads.pick_threads(0, env={})


def test_live_readings_are_sane() -> None:
    n = threads.pick_threads(env={})
    assert 1 <= n <= threads.affinity_cores()
    running = threads.running_now()
    assert running is None or running >= 1  # this process is running while it reads


def test_running_now_reads_proc_stat(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    stat.write_text("cpu  1 2 3\nprocs_running 5\nprocs_blocked 0\n")
    assert threads.running_now(str(stat)) == 5
    assert threads.running_now(str(tmp_path / "missing")) is None


def test_the_command_line_applies_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Every computing command takes --threads and sets torch's count before it runs (here: one that then
    fails on a missing input, after the count was set)."""
    before = torch.get_num_threads()
    seen = []
    monkeypatch.setattr(cli, "apply_threads", lambda n: seen.append(n) or threads.apply_threads(n))
    try:
        rc = cli.main(["purify", str(tmp_path / "missing.npz"), str(tmp_path / "o.npz"), "--method", "jpeg",
                       "--threads", "1"])
        assert rc == 2 and seen == [1] and torch.get_num_threads() == 1
        seen.clear()
        _readings(monkeypatch, cores=2, load=0.0, running=1)
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        cli.main(["purify", str(tmp_path / "missing.npz"), str(tmp_path / "o.npz"), "--method", "jpeg"])
        assert seen == [None] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
