"""``unpoison SUBCOMMAND --help`` exits 0 for every registered sub-command whose module exists."""

from __future__ import annotations

import importlib.util

import pytest

from unpoison.cli import COMMANDS, main

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
