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


def test_a_tracking_password_holding_a_slash_is_in_no_answer_and_no_log_line(
    tmp_path: Path,
) -> None:
    """Issue 20, item 7: it was in /readyz, /experiment and the logs."""
    registry_port = free_port()
    password = "tr4ck/ing@Pa55:word"
    tracking_uri = f"http://alice:{password}@127.0.0.1:{registry_port}"
    config = _config(tmp_path, tracking_uri, f"sqlite:///{tmp_path / 'log.db'}")
    answers, logged = _answers_while_failing(config, registry_port)
    for secret in (password, "tr4ck", "Pa55:word"):
        assert all(secret not in text for text in [*answers, logged]), secret
    assert "alice:***@" in answers[0] + logged


def test_a_log_password_as_a_query_parameter_is_in_no_answer_and_no_log_line(
    tmp_path: Path,
) -> None:
    """Issue 20, item 7: it was in the public /readyz and in 15 log lines."""
    db_port = free_port()
    log_url = f"postgresql://router@127.0.0.1:{db_port}/router?password={LOG_PASSWORD}"
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


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # A password holding "/", "@", ":" (the user information ends at the last "@")
        ("postgresql://u:pa/ss@db/x", "postgresql://u:***@db/x"),
        ("postgresql://u:p@ss@db:5432/x", "postgresql://u:***@db:5432/x"),
        ("http://u:a:b/c@d@host:5000", "http://u:***@host:5000"),
        ("http://u:pa?ss@host/x", "http://u:***@host/x"),
        ("http://u:pa#ss@host/x", "http://u:***@host/x"),
        # Password-like query (and fragment) parameters, in any case and spelling
        (
            "postgresql+psycopg://router@db:5432/r?password=s3cret&sslmode=require",
            "postgresql+psycopg://router@db:5432/r?password=***&sslmode=require",
        ),
        ("mysql://db/x?PWD=a&user=b;Api-Key=c", "mysql://db/x?PWD=***&user=b;Api-Key=***"),
        (
            "https://acct.blob.core.windows.net/c?sv=2024&sig=abc%2F&se=1",
            "https://acct.blob.core.windows.net/c?sv=2024&sig=***&se=1",
        ),
        ("https://h/cb#access_token=t0k&state=1", "https://h/cb#access_token=***&state=1"),
        ("http://h/?client_secret=x&secretKey=y", "http://h/?client_secret=***&secretKey=***"),
        # Both at once, inside longer messages, quoted or not
        (
            'connect "postgresql://u:p/w@db/x?password=q": refused; retry http://a:b@c',
            'connect "postgresql://u:***@db/x?password=***": refused; retry http://a:***@c',
        ),
        ("(sqlite:///tmp/x.db) and file:///etc/x", "(sqlite:///tmp/x.db) and file:///etc/x"),
        # Nothing to mask: ordinary URIs stay as they are
        ("http://host:5000/api?run_id=1&x=2", "http://host:5000/api?run_id=1&x=2"),
        ("http://host/x?email=a@b.com", "http://host/x?email=a@b.com"),
        ("http://host:5000/x?email=a@b.com", "http://host:5000/x?email=a@b.com"),
        ("see https://example.com/docs#section", "see https://example.com/docs#section"),
        ("not a uri: ://x@y and 3://z", "not a uri: ://x@y and 3://z"),
    ],
)
def test_redact_parses_every_uri_shape(text: str, expected: str) -> None:
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
