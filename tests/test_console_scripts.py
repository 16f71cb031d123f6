"""Every console command the package declares is installed beside the interpreter and answers
``--help`` with a usage, a description and exit status 0 (``make install`` puts them there)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def test_the_router_has_a_console_command() -> None:
    assert SCRIPTS["cc-router"] == "router.__main__:main"


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_console_command_answers_help(name: str) -> None:
    command = Path(sys.executable).parent / name
    assert command.exists(), f"{name} is not installed: run `make install`"
    done = subprocess.run(
        [str(command), "--help"], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: {name}")
    assert "``" not in done.stdout  # prose, not a raw docstring
