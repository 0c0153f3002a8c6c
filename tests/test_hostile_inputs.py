"""Small hostile files: one line naming the file, exit 2, and bounded memory before anything is allocated.

Memory is measured two ways: tracemalloc (numpy and Python allocations, in this process) for every
file that claims to be huge, and once with a hard address-space limit on a child process running the
real CLI (an allocation of what a header claims would die there with MemoryError).
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
import tracemalloc
import warnings
from pathlib import Path

import hostile_files as H
import numpy as np
import pytest

from unpoison.data import load_dataset, make_synthetic, save_dataset
from unpoison.errors import UserError, printable

#: generous: the files are at most ~70 KB; an allocation of a claim would be gigabytes
PEAK_LIMIT = 32 << 20


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err and "Warning" not in err, err
    return lines[0]


@pytest.mark.parametrize("name", sorted(H.CLAIMS_HUGE))
def test_small_file_claiming_huge_is_refused_in_bounded_memory(tmp_path: Path, name: str) -> None:
    spec = H.CLAIMS_HUGE[name](tmp_path)
    tracemalloc.start()
    try:
        t0 = time.process_time()  # CPU seconds of this process: a busy machine does not inflate them
        with pytest.raises(UserError) as e:
            load_dataset(spec)
        cpu = time.process_time() - t0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < PEAK_LIMIT, f"{name}: peak {peak >> 20} MiB"
    assert cpu < 20, f"{name}: {cpu:.1f} CPU s (refusing a claim reads headers, not the claim)"
    assert "\n" not in str(e.value) and Path(spec).name in str(e.value)


@pytest.mark.parametrize("name", sorted(H.MALFORMED))
def test_malformed_file_is_one_line_exit_2(tmp_path: Path, run_cli, name: str) -> None:  # type: ignore[no-untyped-def]
    spec = H.MALFORMED[name](tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # float labels with NaN once printed RuntimeWarnings before the error
        rc, out, err = run_cli("info", spec)
    assert rc == 2 and out == ""
    line = _one_line(err)
    assert Path(spec).name in line and "\x1b" not in line


def test_cli_refuses_under_a_hard_memory_limit(tmp_path: Path) -> None:
    """The real CLI in a child whose address space is capped at 1 GiB above its start-up size."""
    specs = [H.CLAIMS_HUGE[n](tmp_path) for n in sorted(H.CLAIMS_HUGE)]
    child = r"""
import resource, sys
from unpoison.cli import build_parser, main
import unpoison.data
build_parser()  # imports every command (and torch) before the limit
vm = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), resource.RLIM_INFINITY))
for spec in sys.argv[1:]:
    print("RC", main(["info", spec]), flush=True)
"""
    r = subprocess.run([sys.executable, "-c", child, *specs], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["RC", "2"] * len(specs), r.stdout
    errs = r.stderr.strip().splitlines()
    assert len(errs) == len(specs) and all(e.startswith("unpoison info: error:") for e in errs), r.stderr[-3000:]


def test_float_labels_refused_like_npz(tmp_path: Path) -> None:
    spec = H.idx_float_nan_labels(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserError, match="integer"):
            load_dataset(spec)
    np.savez(tmp_path / "f.npz", x_train=np.zeros((2, 4, 4, 1), np.uint8), y_train=np.array([0.0, 1.5]))
    with pytest.raises(UserError, match="integers"):
        load_dataset(tmp_path / "f.npz")


@pytest.mark.parametrize("names,msg", [(["a", "a"], "twice"), (["", "b"], "empty"), (["a\nb", "c"], "control"),
                                       (["x" * 300, "b"], "long")])
def test_bad_class_names_refused(tmp_path: Path, names: list[str], msg: str) -> None:
    ds = make_synthetic(n=8, size=8, channels=1, classes=2)
    np.savez(tmp_path / "c.npz", x_train=ds.x_train, y_train=ds.y_train, classes=np.array(names))
    with pytest.raises(UserError, match=msg):
        load_dataset(tmp_path / "c.npz")


def test_names_reach_the_terminal_escaped(tmp_path: Path, run_cli) -> None:  # type: ignore[no-untyped-def]
    evil = tmp_path / "ev\x1b[2Jil.npz"
    rc, _, err = run_cli("info", evil)
    assert rc == 2 and "\x1b" not in err and "\\x1b[2J" in _one_line(err)
    assert printable("a\x1b[31mb\nc\u00a0d") == "a\\x1b[31mb\\nc d"
    # a good dataset under a name with an escape: `info` prints the escaped name
    good = save_dataset(make_synthetic(n=8, size=8, channels=1, classes=2), tmp_path / "ok\x1b[1m.npz")
    rc, out, _ = run_cli("info", good)
    assert rc == 0 and "\x1b" not in out and "\\x1b[1m" in out


@pytest.mark.parametrize("spec,msg", [("synthetic:foo=1", "unknown synthetic option"),
                                      ("synthetic:n=0", "must be in"), ("synthetic:size=0", "must be in"),
                                      ("synthetic:channels=2", "1 or 3"), ("synthetic:n=x", "key=integer"),
                                      ("synthetic:n=4,classes=9", "needs n >= 9"),
                                      ("synthetic:n=10000000,size=1024", "memory budget")])
def test_bad_synthetic_options(run_cli, spec: str, msg: str) -> None:  # type: ignore[no-untyped-def]
    rc, _, err = run_cli("info", spec)
    assert rc == 2 and msg in _one_line(err)


def test_pickled_perturbation_is_one_line_without_torch_text(tmp_path: Path, run_cli) -> None:  # type: ignore[no-untyped-def]
    pt = H.pickled_pt(tmp_path)
    rc, out, err = run_cli("poison", "synthetic:n=16,size=8,classes=2", tmp_path / "o.npz", "--from-perturbation", pt)
    line = _one_line(err)
    assert rc == 2 and "pickled.pt" in line and "weights_only=False" not in line and "must never run" not in out
    assert not (tmp_path / "o.npz").exists()


@pytest.mark.parametrize("argv", [
    ["purify", "{in}", "{out}", "--method", "dvae", "--lr", "inf"],
    ["purify", "{in}", "{out}", "--method", "dvae", "--kld-limit1", "nan"],
    ["purify", "{in}", "{out}", "--method", "dvae", "--batch-size", "0"],
    ["purify", "{in}", "{out}", "--method", "median", "--seed", str(10**20)],
    ["poison", "{in}", "{out}", "--attack", "lsp", "--seed", "-1"],
    ["poison", "{in}", "{out}", "--attack", "em", "--rounds", "-3"],
    ["poison", "{in}", "{out}", "--attack", "em", "--lr", "0"],
    ["poison", "{in}", "{out}", "--attack", "lsp", "--cluster-std", "nan"],
    ["evaluate", "{in}", "--lr", "-1", "--preset", "smoke"],
    ["evaluate", "{in}", "--epochs", "0", "--preset", "smoke"],
    ["evaluate", "{in}", "--lr", "nan", "--preset", "smoke"],
])
def test_parameters_checked_at_the_boundary(tmp_path: Path, run_cli, argv: list[str]) -> None:  # type: ignore[no-untyped-def]
    src = H.good_npz(tmp_path)
    out = tmp_path / "out.npz"
    rc, _, err = run_cli(*[a.format(**{"in": src, "out": out}) for a in argv], "--device", "cpu", "--quiet")
    assert rc == 2
    _one_line(err)
    assert not out.exists() and not Path(str(out) + ".report").exists()


def test_broken_pipe_is_one_line(monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    """``unpoison info X | head -1``: the reader goes away; one line on stderr, exit 2 (the real pipe, with the
    interpreter's final flush, is a case of tests/hostile_corpus.py)."""
    from unpoison.cli import main

    class ClosedPipe(io.StringIO):
        def write(self, s: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

    capsys.readouterr()
    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    rc = main(["info", "synthetic:n=64,size=4,channels=1,classes=4"])
    err = capsys.readouterr().err
    assert rc == 2 and "broken pipe" in _one_line(err)


def test_memory_budget_applies_to_loads_not_to_memory_maps(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """UNPOISON_MAX_MEMORY caps what a load allocates; a memory-mapped npy folder is paged in, not allocated."""
    save_dataset(make_synthetic(n=64, size=16, channels=3, classes=2), tmp_path / "d", "npy")
    monkeypatch.setenv("UNPOISON_MAX_MEMORY", "16K")
    with pytest.raises(UserError, match="memory budget"):
        load_dataset(tmp_path / "d")
    assert load_dataset(tmp_path / "d", mmap=True).x_train.shape == (64, 16, 16, 3)
    monkeypatch.setenv("UNPOISON_MAX_MEMORY", "lots")
    with pytest.raises(UserError, match="UNPOISON_MAX_MEMORY"):
        load_dataset(tmp_path / "d")
