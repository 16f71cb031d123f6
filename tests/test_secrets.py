"""Passwords in the tracking URI and the prediction-log URL never leave the process: not in any
endpoint's answer, not in any log line of ``python -m router``, not in the CLI's error line.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from experiments.cli import evaluate_and_promote_main
from router.redact import RedactingFilter, redact
from tests.conftest import free_port
from tests.live_router import wait_until

REPO_ROOT = Path(__file__).resolve().parent.parent
TRACKING_PASSWORD = "tr4cking-Pa55word"
LOG_PASSWORD = "l0g-Pa55word"
DEADLINE_S = 60.0


def _config(tmp_path: Path, tracking_uri: str, log_url: str) -> Path:
    config = {
        "model": {"name": "m", "tracking_uri": tracking_uri, "startup_retry_interval_s": 0.5},
        "prediction_log": {"url": log_url},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "ROUTER_"))}
    env["PYTHONPATH"] = str(REPO_ROOT)
    env["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    env["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "5"
    return env


def _run_router(config: Path, port: int, output: Path) -> subprocess.Popen[bytes]:
    with output.open("wb") as sink:
        return subprocess.Popen(
            [sys.executable, "-m", "router", "--config", str(config), "--port", str(port)],
            cwd=config.parent,
            env=_env(),
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _answers_while_failing(config: Path, failing_port: int) -> tuple[list[str], str]:
    """Run the router until ``/readyz`` names the unreachable ``failing_port``; every public
    endpoint's answer then, and the whole log output after SIGTERM."""
    port, output = free_port(), config.parent / "router.out"
    process = _run_router(config, port, output)
    answers: list[str] = []
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:

            def failure_reported() -> str | None:
                assert process.poll() is None, output.read_text(errors="replace")
                try:
                    answer = client.get("/readyz")
                except httpx.TransportError:
                    return None
                return answer.text if str(failing_port) in answer.text else None

            answers.append(wait_until(failure_reported, f"/readyz naming port {failing_port}"))
            for path in ("/readyz", "/experiment", "/healthz", "/metrics", "/"):
                answers.append(client.get(path).text)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=DEADLINE_S)
    logged = output.read_text(errors="replace")
    assert str(failing_port) in logged, logged[-2000:]  # the failure was logged...
    return answers, logged


def test_tracking_uri_password_is_in_no_answer_and_no_log_line(tmp_path: Path) -> None:
    registry_port = free_port()  # nothing listens there: every registry call fails
    tracking_uri = f"http://alice:{TRACKING_PASSWORD}@127.0.0.1:{registry_port}"
    config = _config(tmp_path, tracking_uri, f"sqlite:///{tmp_path / 'log.db'}")
    answers, logged = _answers_while_failing(config, registry_port)
    assert all(TRACKING_PASSWORD not in text for text in [*answers, logged])  # ...redacted
    assert "alice:***@" in answers[0] + logged


def test_log_url_password_is_in_no_answer_and_no_log_line(tmp_path: Path) -> None:
    db_port = free_port()  # nothing listens there: the log database is unreachable
    log_url = f"postgresql://router:{LOG_PASSWORD}@127.0.0.1:{db_port}/router"
    config = _config(tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}", log_url)
    answers, logged = _answers_while_failing(config, db_port)
    assert all(LOG_PASSWORD not in text for text in [*answers, logged])


def test_cli_error_line_has_no_password(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log_url = f"postgresql://router:{LOG_PASSWORD}@127.0.0.1:{free_port()}/router"
    tracking_uri = f"http://alice:{TRACKING_PASSWORD}@127.0.0.1:{free_port()}"
    config = _config(tmp_path, tracking_uri, log_url)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        assert evaluate_and_promote_main(["--config", str(config)]) == 1
    captured = capsys.readouterr()
    assert "error" in captured.err
    assert TRACKING_PASSWORD not in captured.out + captured.err
    assert LOG_PASSWORD not in captured.out + captured.err


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("registry http://u:p%40ss@h:5000/api: x", "registry http://u:***@h:5000/api: x"),
        ("postgresql+psycopg://r:s3cret@127.0.0.1/db", "postgresql+psycopg://r:***@127.0.0.1/db"),
        ("'https://:token@host/x'", "'https://:***@host/x'"),
        (
            "no password http://user@host/ or path a:b@c",
            "no password http://user@host/ or path a:b@c",
        ),
        ("two: s3://k:v@b and http://a:b@c", "two: s3://k:***@b and http://a:***@c"),
    ],
)
def test_redact_masks_the_password_of_every_uri(text: str, expected: str) -> None:
    assert redact(text) == expected


def test_log_filter_masks_messages_arguments_and_tracebacks() -> None:
    try:
        raise RuntimeError("connect to http://u:hunter2@h failed")
    except RuntimeError:
        record = logging.LogRecord(
            "x", logging.ERROR, __file__, 1, "using %s", ("http://u:hunter2@h",), sys.exc_info()
        )
    RedactingFilter().filter(record)
    text = logging.Formatter().format(record)
    assert "hunter2" not in text and "http://u:***@h" in text
