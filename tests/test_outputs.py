"""The output contract: nothing outside OUT changes, OUT is never an input, and a crash leaves old or new.

The data-loss cases of issue 13 run through the real CLI; the crash cases kill a real child process
with SIGKILL at a chosen instant of the swap and check that the next run puts things right.
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hostile_files import KILL_AT

from unpoison import outputs
from unpoison.data import load_dataset, make_synthetic, save_dataset
from unpoison.errors import UserError
from unpoison.outputs import MARKER, atomic_path, check_output, is_ours, recover

PURIFY = ["--method", "median", "--device", "cpu", "--quiet"]


def _tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` (hidden ones too) with a hash of its bytes: 'nothing changed' made exact."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
        elif p.is_symlink():
            out[str(p.relative_to(root))] = "-> " + os.readlink(p)
        else:
            out[str(p.relative_to(root)) + "/"] = ""
    return out


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def npz_in(tmp_path: Path) -> Path:
    return save_dataset(make_synthetic(n=32, size=8, channels=1, classes=2, seed=0), tmp_path / "in.npz")


# --- data loss through the CLI ------------------------------------------------------------------
def test_existing_unrelated_folder_is_never_replaced(tmp_path, npz_in, run_cli) -> None:  # type: ignore[no-untyped-def]
    victim = tmp_path / "victim"
    (victim / "sub").mkdir(parents=True)
    (victim / "thesis.tex").write_text("years of work")
    (victim / "sub" / "data.bin").write_bytes(b"\x00\x01")
    before = _tree(tmp_path)
    for extra in ([], ["--overwrite"]):
        rc, _, err = run_cli("purify", npz_in, victim, "--format", "npy", *PURIFY, *extra)
        assert rc == 2
        assert "victim" in _one_line(err)
        assert _tree(tmp_path) == before


@pytest.mark.parametrize("same", ["itself", "symlink", "hardlink"])
def test_output_equal_to_input_is_refused(tmp_path, npz_in, run_cli, same) -> None:  # type: ignore[no-untyped-def]
    out = {"itself": npz_in, "symlink": tmp_path / "link.npz", "hardlink": tmp_path / "hard.npz"}[same]
    if same == "symlink":
        out.symlink_to(npz_in)
    elif same == "hardlink":
        os.link(npz_in, out)
    before = _tree(tmp_path)
    for extra in ([], ["--overwrite"]):
        rc, _, err = run_cli("purify", npz_in, out, *PURIFY, *extra)
        assert rc == 2, err
        _one_line(err)
        assert _tree(tmp_path) == before


def test_imagefolder_purified_onto_itself_or_inside_is_refused(tmp_path, run_cli) -> None:  # type: ignore[no-untyped-def]
    src = save_dataset(make_synthetic(n=16, size=8, channels=1, classes=2), tmp_path / "imgs", "imagefolder")
    before = _tree(tmp_path)
    for out in (src, src / "train" / "purified", tmp_path):
        for extra in ([], ["--overwrite"]):
            rc, _, err = run_cli("purify", src, out, *PURIFY, *extra)
            assert rc == 2, (out, err)
            assert "input" in _one_line(err) or "exists" in err
            assert _tree(tmp_path) == before


def test_overwrite_replaces_only_what_unpoison_wrote(tmp_path, npz_in, run_cli) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out.npz"
    assert run_cli("purify", npz_in, out, *PURIFY)[0] == 0
    first = out.read_bytes()
    rc, _, err = run_cli("purify", npz_in, out, *PURIFY, "--seed", "1")
    assert rc == 2 and "--overwrite" in _one_line(err) and out.read_bytes() == first
    assert run_cli("purify", npz_in, out, "--method", "jpeg", "--quality", "30", "--quiet", "--overwrite")[0] == 0
    assert out.read_bytes() != first and is_ours(out)
    # an NPZ we did not write: even --overwrite leaves it alone
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, x_train=np.zeros((2, 4, 4, 1), np.uint8), y_train=np.array([0, 1]))
    before = foreign.read_bytes()
    rc, _, err = run_cli("purify", npz_in, foreign, *PURIFY, "--overwrite")
    assert rc == 2 and "not written by unpoison" in _one_line(err) and foreign.read_bytes() == before
    # a folder dataset we wrote (marker inside) is replaced with --overwrite; an empty folder is filled
    folder = tmp_path / "folder"
    folder.mkdir()
    assert run_cli("purify", npz_in, folder, "--format", "npy", *PURIFY)[0] == 0
    assert (folder / MARKER).is_file() and (folder / "x_train.npy").is_file()
    assert run_cli("purify", npz_in, folder, "--format", "npy", *PURIFY)[0] == 2
    assert run_cli("purify", npz_in, folder, "--format", "imagefolder", *PURIFY, "--overwrite")[0] == 0
    assert (folder / "train").is_dir() and not (folder / "x_train.npy").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_older_outputs_are_recognised_by_their_manifest(tmp_path, npz_in, run_cli) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "old.npz"
    assert run_cli("purify", npz_in, out, *PURIFY)[0] == 0
    np.savez(out, **{k: v for k, v in np.load(out).items() if k != "_unpoison"})  # as written before markers
    assert is_ours(out)  # OUT.report/manifest.json says purify wrote it
    assert run_cli("purify", npz_in, out, *PURIFY, "--overwrite")[0] == 0


@pytest.mark.parametrize("case", ["dir-for-file", "parent-is-file", "name-too-long", "fifo", "dev-null-child"])
def test_bad_output_paths_are_one_line(tmp_path, npz_in, run_cli, case) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("x")
    out = {"dir-for-file": tmp_path / "adir", "parent-is-file": tmp_path / "afile" / "x.npz",
           "name-too-long": tmp_path / ("n" * 300 + ".npz"), "fifo": tmp_path / "pipe.npz",
           "dev-null-child": Path("/dev/null/x.npz")}[case]
    if case == "fifo":
        os.mkfifo(out)
    before = _tree(tmp_path)
    extra = ["--format", "npz"] if case == "dir-for-file" else []
    for over in ([], ["--overwrite"]):
        rc, _, err = run_cli("purify", npz_in, out, *PURIFY, *extra, *over)
        assert rc == 2, err
        line = _one_line(err)
        assert str(out)[:40] in line
        assert ".tmp" not in line
        assert _tree(tmp_path) == before


def test_full_disk_names_out_and_leaves_nothing(tmp_path, npz_in, run_cli, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from unpoison.data.formats import npz

    def full(self, ds, path):  # type: ignore[no-untyped-def]
        path.write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(npz.NPZFormat, "write", full)
    out = tmp_path / "out.npz"
    rc, _, err = run_cli("purify", npz_in, out, *PURIFY)
    line = _one_line(err)
    assert rc == 2 and str(out) in line and "No space left" in line and ".tmp" not in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.npz"]


def test_read_only_file_system_names_out(tmp_path, monkeypatch) -> None:
    def ro(self, *a, **k):  # type: ignore[no-untyped-def]
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))

    monkeypatch.setattr(Path, "mkdir", ro)
    with pytest.raises(UserError) as e, atomic_path(tmp_path / "x" / "out.json") as tmp:
        tmp.write_text("{}")
    assert str(e.value).startswith(str(tmp_path / "x" / "out.json")) and "Read-only file system" in str(e.value)


def test_evaluate_out_may_not_be_the_training_data(tmp_path, npz_in, run_cli) -> None:  # type: ignore[no-untyped-def]
    before = _tree(tmp_path)
    rc, _, err = run_cli("evaluate", npz_in, "--out", npz_in, "--preset", "smoke", "--device", "cpu", "--quiet",
                         "--overwrite")
    assert rc == 2 and "input" in _one_line(err) and _tree(tmp_path) == before


def test_check_output_api(tmp_path) -> None:
    (tmp_path / "d").mkdir()
    assert check_output(tmp_path / "new.npz") == tmp_path / "new.npz"
    assert check_output(tmp_path / "d", is_dir=True) == tmp_path / "d"  # empty folder: may be filled
    (tmp_path / "d" / "f").write_text("x")
    with pytest.raises(UserError, match="already exists"):
        check_output(tmp_path / "d")
    with pytest.raises(UserError, match="not written by unpoison"):
        check_output(tmp_path / "d", overwrite=True)
    with pytest.raises(UserError, match="contains the input"):
        check_output(tmp_path, inputs=[tmp_path / "d" / "f"], overwrite=True)


# --- crashes: a real process killed at a chosen instant --------------------------------------------------
_CHILD = KILL_AT + """
from unpoison.data import make_synthetic, save_dataset
out = sys.argv[2]
fmt = "npz" if out.endswith(".npz") else "npy"
save_dataset(make_synthetic(n=16, size=8, channels=1, classes=2, seed=1), out, fmt, overwrite=True)
"""


def _kill_child(where: str, out: Path) -> None:
    r = subprocess.run([sys.executable, "-c", _CHILD, where, str(out)], env={**os.environ, "OMP_NUM_THREADS": "1"},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("where,fmt", [("between-renames", "npy"), ("after-exchange", "npy"),
                                       ("while-writing", "npz")])
def test_sigkill_leaves_old_or_new_and_next_run_recovers(tmp_path, where, fmt) -> None:
    out = tmp_path / ("data.npz" if fmt == "npz" else "data")
    old = make_synthetic(n=16, size=8, channels=1, classes=2, seed=0)
    save_dataset(old, out, fmt)
    new = make_synthetic(n=16, size=8, channels=1, classes=2, seed=1)
    _kill_child(where, out)
    left = _leftovers(tmp_path)
    assert left, "the kill left nothing to recover: the injection point was missed"
    if where == "between-renames":
        assert not out.exists() and any(n.endswith(".old") for n in left)
    # reading already finds the old or the new state (a read puts back a folder moved aside)
    got = load_dataset(out).x_train
    expect = new.x_train if where == "after-exchange" else old.x_train
    np.testing.assert_array_equal(got, expect)
    # the next write cleans up whatever the dead process left
    save_dataset(new, out, fmt, overwrite=True)
    assert _leftovers(tmp_path) == []
    np.testing.assert_array_equal(load_dataset(out).x_train, new.x_train)


def test_leftovers_of_a_live_writer_are_not_touched(tmp_path) -> None:
    final = tmp_path / "ds"
    live = subprocess.Popen(["sleep", "30"])
    try:
        tmp = outputs._leftover(final, "tmp")
        name = tmp.name.replace(f".u{os.getpid()}.", f".u{live.pid}.")
        (tmp_path / name).mkdir()
        (tmp_path / name / "work").write_text("in progress")
        assert recover(final) == []
        assert (tmp_path / name / "work").exists()
    finally:
        live.kill()
        live.wait()
    assert recover(final) == [f"removed the temporary {name}"]


def test_pre_contract_leftover_is_restored(tmp_path) -> None:
    """The old writer moved any folder to .NAME.old-PID and could die there; the folder comes back."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    legacy = tmp_path / f".victim.old-{dead.pid}"
    legacy.mkdir()
    (legacy / "thesis.tex").write_text("years of work")
    with pytest.raises(UserError, match="unknown dataset format"):
        load_dataset(tmp_path / "victim")
    assert (tmp_path / "victim" / "thesis.tex").read_text() == "years of work"
    assert _leftovers(tmp_path) == []
