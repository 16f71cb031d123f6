"""One mistake, one line, the same words from the router and from the evaluator.

A new user's first mistakes: a bad key in the config, a wrong tracking URI, a typo in the model
name. Each reads as one short line naming the cause, identical in the router's ``/readyz`` and in
``evaluate_and_promote``'s error, and a bad configuration exits 2 from every command.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import MlflowRegistry, free_port
from console import entry_point_args
from live_router import http_client, wait_until
from router_process import REPO_ROOT, clean_env, router_process

from experiments.cli import evaluate_and_promote_main
from router.config import EXIT_BAD_CONFIG
from router.registry import model_not_found

# The same bad configuration for every command: a misspelt key.
BAD_CONFIG = {"model": {"name": "m"}, "routing": {"challenger_wieght": 0.2}}
COMMANDS = {
    "python -m router": ["-m", "router"],
    "evaluate_and_promote": entry_point_args("experiments.cli:evaluate_and_promote_main"),
    "rollback": entry_point_args("experiments.cli:rollback_main"),
    "python -m router.log": ["-m", "router.log"],
}


@pytest.mark.parametrize("prog", sorted(COMMANDS))
def test_a_bad_configuration_exits_2_with_one_line_from_every_command(
    prog: str, tmp_path: Path
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(BAD_CONFIG), encoding="utf-8")
    args = ["--config", str(config)] + (["views"] if prog == "python -m router.log" else [])
    done = subprocess.run(
        [sys.executable, *COMMANDS[prog], *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=clean_env({}),
        cwd=REPO_ROOT,
        check=False,
    )
    assert done.returncode == EXIT_BAD_CONFIG == 2
    assert done.stdout == ""
    assert done.stderr.strip() == (
        f"{prog}: configuration error: routing.challenger_wieght: unknown key (known: "
        "breaker_cooldown_s, breaker_failures, challenger_weight, mode, routing_key_header, salt)"
    )


def _evaluator_error(
    config: dict[str, object], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> str:
    path = tmp_path / "evaluate.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    assert evaluate_and_promote_main(["--config", str(path)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.strip().splitlines()
    prefix = "evaluate_and_promote: error: "
    assert line.startswith(prefix), line
    return line.removeprefix(prefix)


def _router_reason(
    registry: MlflowRegistry, tmp_path: Path, model: dict[str, object], needle: str
) -> str:
    """The reason the router process gives on /readyz once it names ``needle``."""
    with (
        router_process(registry, tmp_path, model=model, wait_for="/healthz") as router,
        http_client(router.base_url) as client,
    ):

        def reason() -> str | None:
            ready = client.get("/readyz")
            assert ready.status_code == 503
            text = str(ready.json()["reason"])
            return text if needle in text else None

        found = wait_until(reason, f"/readyz to name {needle!r}")
        # The log says it in the same words, without urllib3's raw retries beside it.
        wait_until(lambda: found in router.output_text(), "the log line")
        assert "Max retries exceeded" not in router.output_text(tail=None)
        return found


@pytest.mark.usefixtures("cli_workdir")
def test_a_wrong_tracking_uri_reads_the_same_in_router_and_evaluator(
    mlflow_registry: MlflowRegistry, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    expected = (
        f"MLflow registry at {uri}: connection refused "
        "(no server listening there: check the URI and port)"
    )
    model = {"tracking_uri": uri, "startup_retry_interval_s": 1}

    assert _router_reason(mlflow_registry, tmp_path, model, "MLflow registry") == expected
    config = {"model": {"name": mlflow_registry.model_name, "tracking_uri": uri}}
    assert _evaluator_error(config, tmp_path, capsys) == expected


@pytest.mark.usefixtures("cli_workdir")
def test_a_model_name_typo_reads_the_same_in_router_and_evaluator(
    mlflow_registry: MlflowRegistry, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name = "churn-predictr"
    expected = model_not_found(name, mlflow_registry.tracking_uri)
    model = {"name": name, "startup_retry_interval_s": 1}

    assert _router_reason(mlflow_registry, tmp_path, model, "not found") == expected
    config = {"model": {"name": name, "tracking_uri": mlflow_registry.tracking_uri}}
    assert _evaluator_error(config, tmp_path, capsys) == expected


def test_the_readme_lists_the_exit_codes_the_router_help_lists() -> None:
    from router.__main__ import EPILOG

    in_help = re.findall(r"(?:: |; )(\d) ", " ".join(EPILOG.split()))
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    row = next(line for line in readme.splitlines() if line.startswith("| `cc-router`"))
    in_readme = re.findall(r"(?:\| |; )(\d) ", row)
    assert in_help == in_readme == ["0", "1", "2", "3"]
