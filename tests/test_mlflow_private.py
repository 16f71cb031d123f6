"""MLflow's non-public functions are reached through ``router/mlflow_private.py`` only.

An MLflow upgrade may move or change them; with one module to read, the upgrade has one place to
check (and ``tests/test_mlflow_compat.py`` to run).
"""

from __future__ import annotations

import ast
from pathlib import Path

import mlflow

from router import mlflow_private

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("router", "experiments", "demo", "bench")
SEAM = REPO / "router" / "mlflow_private.py"
# MLflow modules that are not public API: the scoring server's internals and utilities.
PRIVATE_MODULES = ("mlflow.utils", "mlflow.pyfunc.scoring_server")


def _is_private(module: str) -> bool:
    return any(part.startswith("_") for part in module.split(".")) or any(
        module == name or module.startswith(name + ".") for name in PRIVATE_MODULES
    )


def _private_uses(path: Path) -> list[str]:
    """``file:line what`` for each import of a private MLflow module or name, and each
    underscored attribute read from a name an MLflow import bound."""
    tree = ast.parse(path.read_text(), str(path))
    bound: set[str] = set()  # local names of imported MLflow modules and objects
    found: list[str] = []
    where = path.relative_to(REPO)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "mlflow":
                    bound.add(alias.asname or "mlflow")
                    if _is_private(alias.name):
                        found.append(f"{where}:{node.lineno} import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "mlflow":
            module = node.module or ""
            for alias in node.names:
                bound.add(alias.asname or alias.name)
                if _is_private(module) or _is_private(f"{module}.{alias.name}"):
                    found.append(f"{where}:{node.lineno} from {module} import {alias.name}")
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
            and isinstance(node.value, ast.Name)
            and node.value.id in bound
        ):
            found.append(f"{where}:{node.lineno} {node.value.id}.{node.attr}")
    return found


def test_no_module_but_the_seam_reaches_mlflow_internals() -> None:
    files = [p for package in PACKAGES for p in sorted((REPO / package).rglob("*.py"))]
    assert SEAM in files
    found = [use for path in files if path != SEAM for use in _private_uses(path)]
    assert not found, "MLflow internals outside router/mlflow_private.py:\n" + "\n".join(found)


def test_the_scan_finds_what_the_seam_itself_reaches() -> None:
    """The scan is not blind: on the seam it finds every kind of use it looks for."""
    uses = "\n".join(_private_uses(SEAM))
    assert "from mlflow.tracking._tracking_service import utils" in uses
    assert "from mlflow.pyfunc import scoring_server" in uses
    assert "_model_utils._enforce_schema" in uses


def test_the_seam_names_the_mlflow_it_was_checked_against() -> None:
    major_minor = ".".join(mlflow.__version__.split(".")[:2])
    assert f"Checked against MLflow {major_minor}" in (mlflow_private.__doc__ or "")
