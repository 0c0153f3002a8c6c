"""Every command and code block of README.md runs, as written, on a tiny Fashion-MNIST.

The blocks are read from README.md itself (fenced ``bash`` and ``python``), so the test cannot drift from
it: a new block is run too, and a block that fails fails the test. They run in order in one folder, as a
reader would type them. ``fmnist`` is a tiny synthetic stand-in in ``$UNPOISON_DATA`` (how the README's
set-up says to point at one's own copy), and ``unpoison`` on ``PATH`` is this checkout's CLI.

What is changed before running is the table ``SUBSTITUTIONS`` below, nothing else; each entry says why and
must match (a README edit that makes one stale fails here). Commands that take hours or many machines
run as a dry check: ``make -n`` (the commands make would run, not run), ``--help`` after the flags (argparse
checks every flag and choice before it prints), and a ``torchrun`` stand-in that parses its own flags with
torch's parser and then checks the ``unpoison`` command line the same way.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from unpoison.data import make_synthetic, save_dataset

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

#: (README text, what runs instead, why): applied to every block, each must be used at least once
SUBSTITUTIONS: list[tuple[str, str, str]] = [
    ("make demo", 'make -n -C "$REPO" demo', "dry run: the demo takes minutes and installs a venv"),
    ("make test", 'make -n -C "$REPO" test', "dry run: the test suite itself (it would recurse)"),
    ("evaluate clean.npz --preset cpu ", "evaluate clean.npz --preset cpu --epochs 3 ",
     "the cpu protocol trains at least 1,000 steps: 334 epochs of the 300-image stand-in"),
    ('config=TrainConfig.preset("cpu")', 'config=TrainConfig.preset("cpu", epochs=3)', "the same, in the Python API"),
    ("purify lsp.npz clean.npz --preset cpu", "purify lsp.npz clean.npz --preset cpu --steps 20",
     "D-VAE's cpu preset trains 700 steps a stage"),
    ("lsp.npz out.npz --reference", "lsp.npz out.npz --steps 20 --reference", "the same, for --reference"),
    ('DVAEPurifier(preset="cpu")', 'DVAEPurifier(preset="cpu", steps=20)', "the same, in the Python API"),
    ("--preset cpu --train-defense at", "--preset smoke --train-defense at",
     "adversarial training (10 PGD steps a batch) for 3 epochs instead of 15"),
    ("--nproc 4 ", "--nproc 4 --help ", "the imagenet preset on 4 processes: flags checked, not run"),
    ("IN OUT ...", "lsp.npz big.npz", "placeholders of the several-process example"),
    ("IN OUT --preset", "lsp.npz big.npz --preset", "the same"),
    ("/shared/imagenet /shared/out", "lsp.npz big.npz", "the same"),
]

#: the torchrun stand-in: torchrun's own argument parser, then the unpoison command line checked by --help
TORCHRUN = """\
import subprocess, sys
from torch.distributed.run import parse_args
a = parse_args(sys.argv[1:])
if not (a.module and a.training_script == "unpoison"):
    sys.exit(f"torchrun stand-in: expected '-m unpoison', got {a.training_script!r}")
sys.exit(subprocess.call([sys.executable, "-m", "unpoison", *a.training_script_args, "--help"],
                         stdout=subprocess.DEVNULL))
"""


def readme_blocks(text: str) -> list[tuple[int, str, str]]:
    """(line, language, body) of every fenced ``bash`` / ``python`` block, in order."""
    out = []
    for m in re.finditer(r"^```(bash|python)[ \t]*\n(.*?)^```", text, re.M | re.S):
        out.append((text.count("\n", 0, m.start()) + 1, m.group(1), m.group(2)))
    return out


def commands(body: str) -> list[str]:
    """A bash block's commands: continuation lines joined, comment-only and blank lines dropped."""
    out, cur = [], ""
    for line in body.splitlines():
        cur += line
        if cur.endswith("\\"):
            cur = cur[:-1]
            continue
        if cur.strip() and not cur.lstrip().startswith("#"):
            out.append(cur.strip())
        cur = ""
    return out


TEXT = README.read_text()
BLOCKS = readme_blocks(TEXT)
USED: set[str] = set()


def substitute(body: str) -> str:
    for old, new, _why in SUBSTITUTIONS:
        if old in body:
            USED.add(old)
            body = body.replace(old, new)
    return body


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """The reader's folder, a tiny ``fmnist`` and the ``unpoison`` / ``torchrun`` commands on PATH."""
    base = tmp_path_factory.mktemp("readme")
    data = base / "data"
    data.mkdir()
    tiny = make_synthetic(n=300, size=28, channels=1, classes=10, n_test=100, seed=0)
    save_dataset(tiny, data / "fashion-mnist", "idx")
    bin_dir = base / "bin"
    bin_dir.mkdir()
    (bin_dir / "unpoison").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m unpoison "$@"\n')
    (bin_dir / "torchrun").write_text(f"#!{sys.executable}\n{TORCHRUN}")
    for f in bin_dir.iterdir():
        f.chmod(f.stat().st_mode | stat.S_IXUSR)
    run_dir = base / "run"
    run_dir.mkdir()
    env = {**os.environ, "UNPOISON_DATA": str(data), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]),
           "REPO": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return run_dir, env


def test_readme_has_blocks_of_both_kinds() -> None:
    langs = [lang for _, lang, _ in BLOCKS]
    assert langs.count("bash") >= 4 and "python" in langs
    assert len(STEPS) >= 20  # every command of every block is a step


def test_the_runner_reads_what_it_should() -> None:
    """The parser on a planted README: continuation lines joined, comments dropped, both languages found."""
    text = ("x\n```bash\na --b \\\n  c   # note\n# only a comment\n\nd && e\n```\n"
            "```python\nprint(1)\n```\n```text\nno\n```\n")
    blocks = readme_blocks(text)
    assert [(line, lang) for line, lang, _ in blocks] == [(2, "bash"), (9, "python")]
    assert commands(blocks[0][2]) == ["a --b   c   # note", "d && e"]


def _steps() -> list[tuple[int, str, str]]:
    """(README line, language, code): each bash command on its own (a failing one is named, and each has the
    suite's per-test time limit), each Python block whole."""
    out = []
    for line, lang, body in BLOCKS:
        body = substitute(body)
        out += [(line, lang, body)] if lang == "python" else [(line, lang, cmd) for cmd in commands(body)]
    return out


STEPS = _steps()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
@pytest.mark.parametrize("line,lang,code", STEPS, ids=[f"line{line}-{i}-{'-'.join(code.split()[:2])}"
                                                       for i, (line, _, code) in enumerate(STEPS)])
def test_readme_step_runs(line: int, lang: str, code: str, work: tuple[Path, dict[str, str]]) -> None:
    run_dir, env = work
    argv = [sys.executable, "-c", code] if lang == "python" else ["bash", "-euo", "pipefail", "-c", code]
    r = subprocess.run(argv, cwd=run_dir, env=env, capture_output=True, text=True, timeout=590)
    assert r.returncode == 0, (f"README.md line {line}: {'the Python block' if lang == 'python' else code!r} "
                               f"exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")


def test_every_substitution_is_used() -> None:
    """Runs after the blocks: a substitution that no longer matches the README is stale."""
    stale = [old for old, _, _ in SUBSTITUTIONS if old not in USED]
    assert not stale, f"SUBSTITUTIONS entries that match nothing in README.md: {stale}"


def test_public_names_are_not_shadowed_by_modules() -> None:
    """``from unpoison import evaluate`` must give the function even after ``import unpoison.X`` bound a
    submodule of that name to the package (how the README's example broke)."""
    import importlib.util

    import unpoison

    for name in unpoison.__all__:
        if name != "__version__":
            assert importlib.util.find_spec(f"unpoison.{name}") is None, f"unpoison.{name} is also a module"
    from unpoison import evaluate

    assert callable(evaluate) and evaluate.__module__ == "unpoison.scoring"


def test_what_the_code_cites_is_in_the_repository() -> None:
    """Every ``docs/...`` path a module or benchmark names exists (the design facts: docs/design.md)."""
    cited: set[str] = set()
    for f in [*(ROOT / "src").rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py")]:
        text = f.read_text()
        assert "PAPER.md" not in text, f"{f} cites PAPER.md, which is not in the repository (docs/design.md is)"
        cited |= {m.rstrip(".") for m in re.findall(r"docs/[\w./-]*\w", text)}
    assert "docs/design.md" in cited
    missing = sorted(c for c in cited if not (ROOT / c).exists())
    assert not missing, f"cited but missing: {missing}"
