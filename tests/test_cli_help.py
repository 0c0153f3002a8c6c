"""``unpoison SUBCOMMAND --help`` exits 0 for every registered sub-command whose module exists."""

from __future__ import annotations

import importlib.util
import re

import pytest

from unpoison.cli import COMMANDS, main, plain

PRESENT = [name for name, mod in COMMANDS.items() if importlib.util.find_spec(f"unpoison.cli.{mod}") is not None]


def test_some_commands_exist() -> None:
    assert {"info", "evaluate"} <= set(PRESENT)


@pytest.mark.parametrize("name", PRESENT)
def test_help_exits_zero(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    assert "usage: unpoison " + name in capsys.readouterr().out


def test_top_level_help_lists_them(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in PRESENT)


# --- help is plain text --------------------------------------------------------------------------------------
#: reStructuredText a terminal would show raw: double backquotes, roles (:mod:`x`), a literal-block ``::``
RST = re.compile(r"``|:[a-z]+:`|::\s*$", re.M)


def _help_argvs() -> list[list[str]]:
    from unpoison.attacks import ATTACKS
    from unpoison.defenses import DEFENSES, TRAIN_DEFENSES

    out = [["--help"]] + [[name, "--help"] for name in PRESENT]
    out += [["purify", "--method", m, "--help"] for m in DEFENSES.names()]
    out += [["poison", "--attack", a, "--help"] for a in ATTACKS.names()]
    out += [["evaluate", "--train-defense", t, "--help"] for t in TRAIN_DEFENSES.names()]
    return out


@pytest.mark.parametrize("argv", _help_argvs(), ids=lambda a: " ".join(a))
def test_help_is_plain_text(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: unpoison")
    bad = [line for line in out.splitlines() if RST.search(line)]
    assert not bad, "reStructuredText in `unpoison " + " ".join(argv) + "`:\n" + "\n".join(bad)


def test_plain_drops_the_markup() -> None:
    text = "Run ``unpoison\npurify`` (see :mod:`unpoison.scan`, :class:`~unpoison.errors.UserError`)::\n"
    assert plain(text) == "Run unpoison\npurify (see unpoison.scan, UserError):\n"
    assert not RST.search(plain(text))
