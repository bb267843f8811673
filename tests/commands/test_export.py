"""``fr-distill export`` and ``tools/export.py`` answer ``--help``."""
from __future__ import annotations

import runpy
import sys

import pytest

from conftest import REPO


def test_cli_and_tool_answer_help(monkeypatch, capsys):
    from fr_distill import cli

    with pytest.raises(SystemExit) as done:
        cli.main(["export", "--help"])
    assert done.value.code == 0 and "--tolerance-fp16" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", ["tools/export.py", "--help"])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(REPO / "tools" / "export.py"), run_name="__main__")
    assert done.value.code == 0 and "--tolerance-fp16" in capsys.readouterr().out
