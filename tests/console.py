"""The project's console commands as processes of their own, as a CronJob runs them.

``run_entry_point("experiments.cli:evaluate_and_promote_main", "--config", ...)`` runs the
function an installed console script calls (``pyproject.toml``'s ``[project.scripts]``) under
this interpreter, with this checkout first on ``PYTHONPATH``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def entry_point_args(entry: str) -> list[str]:
    """Interpreter arguments that call ``module:function`` and exit with what it returns."""
    module, function = entry.split(":")
    return ["-c", f"import sys; from {module} import {function} as m; sys.exit(m())"]


def run_entry_point(
    entry: str, *args: str, cwd: Path, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    base = {**os.environ, "PYTHONPATH": str(REPO)} if env is None else dict(env)
    return subprocess.run(
        [sys.executable, *entry_point_args(entry), *args],
        cwd=cwd,
        env=base,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
