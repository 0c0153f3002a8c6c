"""Shared fixtures: tiny synthetic datasets, an output folder, and a CLI runner. Keep this generic."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from unpoison.data import ImageDataset, make_synthetic


@pytest.fixture
def tiny_rgb() -> ImageDataset:
    """64 train / 16 test RGB 16x16 images, 4 classes with an obvious signal."""
    return make_synthetic(n=64, size=16, channels=3, classes=4, seed=0)


@pytest.fixture
def tiny_gray() -> ImageDataset:
    """64 train / 16 test grayscale 28x28 images, 4 classes."""
    return make_synthetic(n=64, size=28, channels=1, classes=4, seed=1)


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    """A fresh folder for a test's outputs (it exists and is empty)."""
    d = tmp_path / "out"
    d.mkdir()
    return d


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    """``run_cli("info", path)`` -> (exit code, stdout, stderr) of ``unpoison.cli.main``."""
    from unpoison.cli import main

    def run(*argv: object) -> tuple[int, str, str]:
        capsys.readouterr()
        rc = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return rc, out, err

    return run


# --- the suite's last line: how many real-data tests were skipped, and why (``make test`` relies on it) -----
_REAL_DATA_SKIPS: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and "fashion-mnist" in str(report.longrepr).lower():
        why = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        _REAL_DATA_SKIPS.append(str(why))


def pytest_unconfigure(config: pytest.Config) -> None:
    tr = config.pluginmanager.get_plugin("terminalreporter")
    if tr is None or config.getoption("collectonly", False):
        return
    if _REAL_DATA_SKIPS:
        reason = _REAL_DATA_SKIPS[0].removeprefix("Skipped: ")
        tr.write_line(f"real-data tests: {len(_REAL_DATA_SKIPS)} SKIPPED ({reason}; install it with 'make data')")
    else:
        tr.write_line("real-data tests: none skipped")
