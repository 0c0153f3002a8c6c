"""Replay issue 13's hostile corpus through the real CLI and print what happened, case by case.

    PYTHONPATH=src python tests/hostile_corpus.py [--keep DIR] [--only TEXT] [--json FILE]

Every case runs in its own sandbox folder: hostile inputs (files that claim to be huge, malformed
labels and names, pickles, MAT files), bad output paths, bad parameters, SIGKILL at chosen instants
of a write or of training, a broken pipe, a full disk and a read-only file system (real tmpfs
mounts when this runs as root, else a file-size limit and a simulated one). Each row says the exit
code, whether stderr was the one promised line, whether anything in the sandbox outside OUT (and
its report folder) changed, and the peak traced memory of in-process cases. The script exits 1 if
any case misses its promise. Most cases run in this process (fast); crashes, pipes and mounts run
in child processes.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

import hostile_files as H  # noqa: E402
import numpy as np  # noqa: E402

from unpoison.cli import main  # noqa: E402
from unpoison.data import load_dataset, make_synthetic, save_dataset  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
    [str(HERE.parent / "src"), str(HERE), os.environ.get("PYTHONPATH", "")])}
FAST = ["--device", "cpu", "--quiet"]
JPEG = ["--method", "jpeg", "--quiet"]


@dataclass
class Result:
    case: str
    command: str
    expect: int
    rc: int | str = "-"
    one_line: bool | None = None
    outside_changed: bool | None = None
    peak_mib: float | None = None
    note: str = ""
    ok: bool = False


@dataclass
class Case:
    """``setup(box)`` builds inputs and returns the argv (or runs a child itself via ``custom``)."""

    name: str
    setup: Callable[[Path], list[str]]
    expect: int = 2
    outs: tuple[str, ...] = ("out", "out.npz", "out.csv", "out.json")
    custom: Callable[[Path, Case], Result] | None = None
    extra: dict[str, object] = field(default_factory=dict)


# --- helpers -------------------------------------------------------------------------------------------------
def snapshot(box: Path, outs: tuple[str, ...]) -> dict[str, str]:
    """Every path under ``box`` except OUT and its siblings (``OUT.report``, ``OUT.json``), with content hashes."""
    skip = {box / o for o in outs} | {box / (o + suffix) for o in outs for suffix in (".report", ".json")}
    snap: dict[str, str] = {}
    for root, dirs, files in os.walk(box, followlinks=False):
        r = Path(root)
        dirs[:] = [d for d in dirs if r / d not in skip]
        for n in dirs:
            snap[str((r / n).relative_to(box)) + "/"] = ""
        for n in files:
            p = r / n
            if p in skip:
                continue
            if p.is_symlink():
                snap[str(p.relative_to(box))] = "-> " + os.readlink(p)
            elif p.is_file():
                snap[str(p.relative_to(box))] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                snap[str(p.relative_to(box))] = "special"
    return snap


def promised_line(rc: int, err: str) -> bool:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    if rc == 0:
        return "Traceback" not in err
    return len(lines) == 1 and lines[0].startswith("unpoison ") and "Traceback" not in err


def run_inprocess(argv: list[str], trace: bool = True) -> tuple[int | str, str, float | None]:
    out, err = io.StringIO(), io.StringIO()
    if trace:
        tracemalloc.start()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc: int | str = main(argv)
            except SystemExit as e:  # argparse usage errors
                rc = int(e.code) if isinstance(e.code, int) else 2
            except BaseException as e:  # noqa: BLE001 - a traceback is exactly what this script looks for
                import traceback

                err.write("Traceback (most recent call last):\n" + "".join(traceback.format_exception(e)))
                rc = "traceback"
        peak = tracemalloc.get_traced_memory()[1] / 2**20 if trace else None
    finally:
        if trace:
            tracemalloc.stop()
    return rc, err.getvalue(), peak


def run_child(code: str, args: list[str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=ENV,
                          timeout=timeout)


def cli_child(argv: list[str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return run_child("import sys; from unpoison.cli import main; sys.exit(main(sys.argv[1:]))", argv, timeout)


def good(box: Path, name: str = "in.npz", channels: int = 3) -> str:
    return str(save_dataset(make_synthetic(n=32, size=8, channels=channels, classes=2, seed=0), box / name))


# --- the cases --------------------------------------------------------------------------------------------------
def data_loss_cases() -> list[Case]:
    def victim(box: Path, over: bool) -> list[str]:
        src = good(box)
        (box / "out" / "sub").mkdir(parents=True)
        (box / "out" / "thesis.tex").write_text("years of work")
        (box / "out" / "sub" / "data.bin").write_bytes(b"\x00\x01")
        return ["purify", src, str(box / "out"), "--format", "npy", *JPEG, *(["--overwrite"] if over else [])]

    def same(box: Path, over: bool) -> list[str]:
        src = good(box)
        return ["purify", src, src, *JPEG, *(["--overwrite"] if over else [])]

    def imgfolder_self(box: Path) -> list[str]:
        src = save_dataset(make_synthetic(n=16, size=8, channels=1, classes=2), box / "imgs", "imagefolder")
        return ["purify", str(src), str(src), *JPEG, "--overwrite"]

    def inside(box: Path) -> list[str]:
        src = save_dataset(make_synthetic(n=16, size=8, channels=1, classes=2), box / "imgs", "imagefolder")
        return ["purify", str(src), str(src / "train" / "out.npz"), *JPEG]

    def link(box: Path) -> list[str]:
        src = good(box)
        (box / "out.npz").symlink_to(src)
        return ["purify", src, str(box / "out.npz"), *JPEG, "--overwrite"]

    def hardlink(box: Path) -> list[str]:
        src = good(box)
        os.link(src, box / "out.npz")
        return ["purify", src, str(box / "out.npz"), *JPEG, "--overwrite"]

    def control(box: Path) -> list[str]:
        return ["purify", good(box), str(box / "out.npz"), *JPEG]

    def rerun(box: Path, over: bool) -> list[str]:
        src = good(box)
        assert main(["purify", src, str(box / "out.npz"), *JPEG]) == 0
        return ["purify", src, str(box / "out.npz"), "--method", "jpeg", "--quality", "50", "--quiet",
                *(["--overwrite"] if over else [])]

    def foreign(box: Path) -> list[str]:
        np.savez(box / "out.npz", x_train=np.zeros((2, 4, 4, 1), np.uint8), y_train=np.array([0, 1]))
        (box / "keep.txt").write_text("x")
        return ["purify", good(box), str(box / "out.npz"), *JPEG, "--overwrite"]

    def eval_onto_input(box: Path) -> list[str]:
        src = good(box)
        return ["evaluate", src, "--out", src, "--preset", "smoke", *FAST, "--overwrite"]

    return [
        Case("purify onto an unrelated folder", lambda b: victim(b, False), outs=()),
        Case("  ... with --overwrite", lambda b: victim(b, True), outs=()),
        Case("purify in.npz in.npz", lambda b: same(b, False), outs=()),
        Case("  ... with --overwrite", lambda b: same(b, True), outs=()),
        Case("imagefolder purified onto itself", imgfolder_self, outs=()),
        Case("OUT inside IN", inside, outs=()),
        Case("OUT is a symlink to IN", link, outs=()),
        Case("OUT is a hard link to IN", hardlink, outs=()),
        Case("NPZ not written by unpoison, --overwrite", foreign, outs=()),
        Case("evaluate --out = the training data", eval_onto_input, outs=()),
        Case("control: purify to a new OUT", control, expect=0, outs=("out.npz",)),
        Case("rerun onto our OUT without --overwrite", lambda b: rerun(b, False), outs=()),
        Case("rerun onto our OUT with --overwrite", lambda b: rerun(b, True), expect=0, outs=("out.npz",)),
    ]


def output_path_cases() -> list[Case]:
    def p(out: Callable[[Path], Path], fmt: tuple[str, ...] = ()) -> Callable[[Path], list[str]]:
        def setup(box: Path) -> list[str]:
            (box / "adir").mkdir()
            (box / "afile").write_text("x")
            return ["purify", good(box), str(out(box)), *fmt, *JPEG]

        return setup

    def fifo(box: Path) -> Path:
        os.mkfifo(box / "pipe.npz")
        return box / "pipe.npz"

    return [
        Case("OUT is a directory (npz output)", p(lambda b: b / "adir", ("--format", "npz")), outs=()),
        Case("OUT's parent is a file", p(lambda b: b / "afile" / "x.npz"), outs=()),
        Case("OUT name too long", p(lambda b: b / ("n" * 300 + ".npz")), outs=()),
        Case("OUT = /dev/null/x.npz", p(lambda b: Path("/dev/null/x.npz")), outs=()),
        Case("OUT is a FIFO", p(fifo), outs=()),
        Case("full disk", lambda b: [], custom=full_disk, outs=("out.npz",)),
        Case("read-only file system", lambda b: [], custom=read_only, outs=("out.npz",)),
    ]


def _mount(target: Path, opts: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    target.mkdir(exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(target)], capture_output=True)
    return r.returncode == 0


def _umount(target: Path) -> None:
    subprocess.run(["umount", str(target)], capture_output=True)


def full_disk(box: Path, case: Case) -> Result:
    """A 64 KiB tmpfs (root) or a 64 KiB file-size limit (RLIMIT_FSIZE): the write fails midway."""
    src = good(box, channels=3)
    big = save_dataset(make_synthetic(n=512, size=16, channels=3, classes=2), box / "big.npz")
    disk = box / "disk"
    mounted = _mount(disk, "size=64k")
    if mounted:
        before = snapshot(box, ("disk",))
        r = cli_child(["purify", str(big), str(disk / "out.npz"), *JPEG])
        changed = snapshot(box, ("disk",)) != before or sorted(os.listdir(disk)) != []
        _umount(disk)
        how = "tmpfs size=64k"
    else:
        disk.mkdir()
        before = snapshot(box, ())
        code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
                "resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536)); "
                "from unpoison.cli import main; sys.exit(main(sys.argv[1:]))")
        r = run_child(code, ["purify", str(big), str(disk / "out.npz"), *JPEG])
        changed = snapshot(box, ()) != before
        how = "RLIMIT_FSIZE 64 KiB"
    del src
    return Result(case.name, f"purify big.npz disk/out.npz ({how})", 2, r.returncode,
                  promised_line(r.returncode, r.stderr), changed, note=r.stderr.strip()[-160:])


def read_only(box: Path, case: Case) -> Result:
    src = good(box)
    ro = box / "ro"
    if not _mount(ro, "ro,size=64k"):
        return Result(case.name, "purify in.npz ro/out.npz", 2, "skip", note="needs root and tmpfs", ok=True)
    before = snapshot(box, ("ro",))
    r = cli_child(["purify", src, str(ro / "out.npz"), *JPEG])
    changed = snapshot(box, ("ro",)) != before or os.listdir(ro) != []
    _umount(ro)
    return Result(case.name, "purify in.npz ro/out.npz (tmpfs ro)", 2, r.returncode,
                  promised_line(r.returncode, r.stderr), changed, note=r.stderr.strip()[-160:])


def hostile_file_cases() -> list[Case]:
    cases = []
    for name, build in {**H.CLAIMS_HUGE, **H.MALFORMED}.items():
        cases.append(Case(f"info: {name}", lambda b, build=build: ["info", build(b)], outs=()))
    subset = ["npz: header claims 10^9 images", "idx: .gz inflates to 64 MB past header", "cifar: memo index 2^30",
              "svhn: compressed var claims 2 GiB", "imagefolder: 40 PNGs claim 9000x9000", "npz: 0-d labels",
              "idx: float labels with NaN"]
    builders = {**H.CLAIMS_HUGE, **H.MALFORMED}
    commands: dict[str, Callable[[str, Path], list[str]]] = {
        "purify(jpeg)": lambda s, b: ["purify", s, str(b / "out.npz"), *JPEG],
        "poison(lsp)": lambda s, b: ["poison", s, str(b / "out.npz"), "--attack", "lsp", *FAST],
        "evaluate": lambda s, b: ["evaluate", s, "--preset", "smoke", "--out", str(b / "out.json"), *FAST],
        "detect": lambda s, b: ["detect", s, str(b / "out.csv"), "--method", "dvae", "--preset", "smoke", *FAST],
        "scan": lambda s, b: ["scan", s, "--samples", str(b / "out.csv"), "--quiet"],
    }
    for cmd, make in commands.items():
        for name in subset:
            cases.append(Case(f"{cmd}: {name}", lambda b, build=builders[name], make=make: make(build(b), b)))
    return cases


def parameter_cases() -> list[Case]:
    def with_in(*argv: str) -> Callable[[Path], list[str]]:
        def setup(b: Path) -> list[str]:
            src = good(b)
            return [a.replace("{in}", src).replace("{out}", str(b / "out.npz")) for a in argv]

        return setup

    def pickled(b: Path) -> list[str]:
        return ["poison", good(b), str(b / "out.npz"), "--from-perturbation", H.pickled_pt(b), *FAST]

    tiny_dvae = ["--method", "dvae", "--preset", "cpu", "--width", "4", "--latent", "8", "--epochs", "1", *FAST]
    return [
        Case("purify --lr inf", with_in("purify", "{in}", "{out}", "--lr", "inf", *tiny_dvae)),
        Case("purify --kld-limit1 nan", with_in("purify", "{in}", "{out}", "--kld-limit1", "nan", *tiny_dvae)),
        Case("purify --lr 1e30 (training diverges)", with_in("purify", "{in}", "{out}", "--lr", "1e30", *tiny_dvae)),
        Case("purify --seed 10**20", with_in("purify", "{in}", "{out}", "--seed", str(10**20), *JPEG)),
        Case("poison --seed -1", with_in("poison", "{in}", "{out}", "--attack", "lsp", "--seed", "-1", *FAST)),
        Case("poison em --lr 1e30 (surrogate diverges)",
             with_in("poison", "{in}", "{out}", "--attack", "em", "--preset", "cpu", "--surrogate", "tinycnn",
                     "--rounds", "2", "--pgd-steps", "1", "--lr", "1e30", *FAST)),
        Case("evaluate --lr -1", with_in("evaluate", "{in}", "--lr", "-1", "--preset", "smoke", *FAST)),
        Case("evaluate --lr 1e30 (training diverges)",
             with_in("evaluate", "{in}", "--lr", "1e30", "--preset", "smoke", "--out", "{out}", *FAST)),
        Case("synthetic:foo=1", lambda b: ["info", "synthetic:foo=1"]),
        Case("synthetic:n=0", lambda b: ["info", "synthetic:n=0"]),
        Case("synthetic:n=10**7,size=1024", lambda b: ["info", "synthetic:n=10000000,size=1024"]),
        Case("pickled --from-perturbation .pt", pickled),
    ]


# --- process-level cases -------------------------------------------------------------------------------------------
_KILL = H.KILL_AT + """
from unpoison.cli import main
sys.exit(main(sys.argv[2:]))
"""


def sigkill_case(where: str, fmt: str) -> Case:
    def custom(box: Path, case: Case) -> Result:
        src = good(box)
        out = box / ("out.npz" if fmt == "npz" else "out")
        assert main(["purify", src, str(out), "--format", fmt, "--method", "jpeg", "--quality", "50", "--quiet"]) == 0
        old = load_dataset(out).x_train
        before = snapshot(box, ())
        r = run_child(_KILL, [where, "purify", src, str(out), "--format", fmt, *JPEG, "--overwrite"])
        killed = r.returncode == -signal.SIGKILL
        left = sorted(n for n in os.listdir(box) if n.startswith("."))
        rc, err, _ = run_inprocess(["info", str(out)], trace=False)  # the next run: a read recovers a moved folder
        got = load_dataset(out).x_train
        state = "old" if np.array_equal(got, old) else "new"
        rc2, err2, _ = run_inprocess(["purify", src, str(out), "--format", fmt, *JPEG, "--overwrite"], trace=False)
        after_left = sorted(n for n in os.listdir(box) if n.startswith("."))
        changed = {k: v for k, v in snapshot(box, (out.name,)).items()} != \
            {k: v for k, v in before.items() if not k.startswith(out.name)}
        ok_state = state == ("new" if where == "after-exchange" else "old")
        note = (f"killed={killed}; left {len(left)} leftover(s); next read: {state} state (rc {rc}); "
                f"after next write: {len(after_left)} leftover(s)")
        return Result(case.name, f"SIGKILL {where}, then info + purify --overwrite", 0, rc2,
                      promised_line(rc, err) and promised_line(rc2, err2), changed or bool(after_left) or not ok_state
                      or not killed, note=note)

    return Case(f"SIGKILL {where} ({fmt})", lambda b: [], custom=custom, expect=0)


def sigkill_training(box: Path, case: Case) -> Result:
    """Kill D-VAE purification after its first checkpoint; --resume must finish to the uninterrupted result."""
    src = str(save_dataset(make_synthetic(n=512, size=8, channels=1, classes=2, seed=0), box / "in.npz"))
    argv = ["purify", src, "", "--method", "dvae", "--preset", "cpu", "--width", "4", "--latent", "8", "--epochs", "4",
            "--batch-size", "16", *FAST]
    ref = box / "ref.npz"
    assert main([a or str(ref) for a in argv]) == 0
    out = box / "out.npz"
    before = snapshot(box, ("out.npz",))
    child = "import sys; from unpoison.cli import main; sys.exit(main(sys.argv[1:]))"
    p = subprocess.Popen([sys.executable, "-c", child, *[a or str(out) for a in argv]], env=ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ck = box / "out.npz.report" / "checkpoints" / "stage1.epoch.pt"
    t0 = time.time()
    while not ck.exists() and p.poll() is None and time.time() - t0 < 300:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.stderr is not None
    p.stderr.close()
    rc, err, _ = run_inprocess([a or str(out) for a in argv] + ["--resume"], trace=False)
    same = rc == 0 and np.array_equal(load_dataset(out).x_train, load_dataset(ref).x_train)
    changed = snapshot(box, ("out.npz",)) != before
    return Result(case.name, "purify dvae; SIGKILL after an epoch checkpoint; --resume", 0, rc,
                  promised_line(rc, err), changed or not same,
                  note=f"killed={p.returncode == -signal.SIGKILL}; resumed result identical to uninterrupted: {same}")


def broken_pipe(box: Path, case: Case) -> Result:
    p = subprocess.Popen([sys.executable, "-c", "import sys; from unpoison.cli import main; sys.exit(main())",
                          "info", "synthetic:n=10000,size=4,channels=1,classes=10000", "--json"], env=ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None and p.stderr is not None
    p.stdout.read(10)
    p.stdout.close()
    err = p.stderr.read().decode()
    p.stderr.close()
    rc = p.wait()
    return Result(case.name, "info ... --json | head -c 10", 2, rc, promised_line(rc, err), False,
                  note=err.strip()[-120:])


def process_cases() -> list[Case]:
    return [sigkill_case("between-renames", "npy"), sigkill_case("after-exchange", "npy"),
            sigkill_case("while-writing", "npz"),
            Case("SIGKILL during D-VAE training, then --resume", lambda b: [], custom=sigkill_training, expect=0),
            Case("info | head (broken pipe)", lambda b: [], custom=broken_pipe)]


# --- driver ----------------------------------------------------------------------------------------------------------
def run_case(case: Case, box: Path) -> Result:
    box.mkdir(parents=True)
    if case.custom is not None:
        res = case.custom(box, case)
    else:
        argv = case.setup(box)
        before = snapshot(box, case.outs)
        rc, err, peak = run_inprocess(argv)
        changed = snapshot(box, case.outs) != before
        cmd = " ".join(a.replace(str(box) + "/", "") for a in argv)
        res = Result(case.name, cmd if len(cmd) < 90 else cmd[:87] + "...", case.expect, rc, promised_line(
            rc if isinstance(rc, int) else 1, err), changed, peak, err.strip().splitlines()[-1][:160] if err.strip()
            else "")
    if res.rc != "skip":
        res.ok = res.rc == res.expect and bool(res.one_line) and not res.outside_changed
    return res


def main_corpus() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", default=None, help="sandbox root to keep (default: a temporary folder, removed)")
    ap.add_argument("--only", default=None, help="run only cases whose name contains this text")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="hostile-"))
    with contextlib.redirect_stdout(io.StringIO()):
        main(["list"])  # import every command once, so the first case's peak is not the imports
    cases = data_loss_cases() + output_path_cases() + hostile_file_cases() + parameter_cases() + process_cases()
    if args.only:
        cases = [c for c in cases if args.only in c.name]
    rows: list[Result] = []
    t0 = time.time()
    for i, case in enumerate(cases):
        res = run_case(case, root / f"{i:03d}")
        rows.append(res)
        print(f"[{i + 1}/{len(cases)}] {'ok  ' if res.ok else 'MISS'} {case.name}", file=sys.stderr, flush=True)
    print("| # | case | command | exit (want) | one line | outside OUT changed | peak MiB | ok |")
    print("|---|---|---|---|---|---|---|---|")
    for i, r in enumerate(rows):
        peak = "" if r.peak_mib is None else f"{r.peak_mib:.1f}"
        cmd = r.command.replace("|", "\\|")
        print(f"| {i + 1} | {r.case.replace('|', chr(92) + '|')} | `{cmd}` | {r.rc} ({r.expect}) | "
              f"{'yes' if r.one_line else 'NO'} | "
              f"{'YES' if r.outside_changed else 'no'} | {peak} | {'ok' if r.ok else '**MISS**'} |")
    misses = [r for r in rows if not r.ok]
    print(f"\n{len(rows) - len(misses)}/{len(rows)} cases met the promise "
          f"(exit code, one line, nothing outside OUT changed) in {time.time() - t0:.0f} s.")
    for r in rows:
        if r.note and (not r.ok or r.case.startswith(("SIGKILL", "full", "read-only", "info | head"))):
            print(f"- {r.case}: {r.note}")
    if args.json:
        Path(args.json).write_text(json.dumps([r.__dict__ for r in rows], indent=1, default=str))
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main_corpus())
