"""Configuration is validated once, rejects instead of repairing, and names the bad key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from router.config import ConfigError, load_settings, settings_from_mapping

REPO = Path(__file__).resolve().parent.parent


def test_the_shipped_config_is_valid_and_matches_the_defaults() -> None:
    shipped = load_settings(REPO / "config.yaml", env={})
    defaults = settings_from_mapping({"model": {"name": "churn-predictor"}}, env={})
    assert shipped == defaults


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({}, "model.name"),
        ({"model": {"name": "m", "colour": "red"}}, "model.colour"),
        (
            {"model": {"name": "m"}, "routing": {"challenger_weight": 1.5}},
            "routing.challenger_weight",
        ),
        (
            {"model": {"name": "m"}, "routing": {"challenger_weight": "10%"}},
            "routing.challenger_weight",
        ),
        ({"model": {"name": "m"}, "routing": {"mode": "canary"}}, "routing.mode"),
        (
            {"model": {"name": "m"}, "validation": {"extra_columns": "drop"}},
            "validation.extra_columns",
        ),
        ({"model": {"name": "m"}, "validation": {"non_finite": False}}, "validation.non_finite"),
        ({"model": {"name": "m"}, "limits": {"max_rows": 0}}, "limits.max_rows"),
        ({"model": {"name": "m"}, "limits": {"max_rows": True}}, "limits.max_rows"),
        ({"model": {"name": "m"}, "limits": {"max_connections": 0}}, "limits.max_connections"),
        (
            {"model": {"name": "m"}, "limits": {"header_read_timeout_s": 0}},
            "limits.header_read_timeout_s",
        ),
        ({"model": {"name": "m"}, "experiment": {"metric": "auc"}}, "experiment.metric"),
        ({"model": {"name": "m"}, "experiment": {"alpha": 1}}, "experiment.alpha"),
        (
            {"model": {"name": "m"}, "experiment": {"guardrails": {"max_error_rate": 0.1}}},
            "experiment.guardrails.max_error_rate",
        ),
        ({"model": {"name": "m"}, "experiment": {"method": "bayes"}}, "experiment.method"),
        ({"model": {"name": "m"}, "experiment": {"adjustment": "on"}}, "experiment.adjustment"),
        (
            {"model": {"name": "m"}, "experiment": {"guardrails": {"max_latency_p95_ms": 0}}},
            "experiment.guardrails.max_latency_p95_ms",
        ),
        ({"model": {"name": "m"}, "server": {"port": 70000}}, "server.port"),
        ({"model": {"name": "m"}, "prediction_log": "sqlite:///x.db"}, "prediction_log"),
        ({"model": {"name": "m", "champion_alias": "a", "challenger_alias": "a"}}, "model."),
        ({"model": {"name": "m"}, "admin_token": "secret"}, "admin_token"),
    ],
)
def test_a_bad_key_or_value_is_named(raw: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        settings_from_mapping(raw, env={})
    assert str(caught.value).startswith(key)


def test_environment_overrides() -> None:
    env = {
        "MLFLOW_TRACKING_URI": "http://mlflow:5000",
        "ROUTER_PREDICTION_LOG_URL": "postgresql+psycopg://u:p@db/predictions",
        "ROUTER_ADMIN_TOKEN": "t0ken",
    }
    settings = settings_from_mapping({"model": {"name": "m"}}, env=env)
    assert settings.model.tracking_uri == "http://mlflow:5000"
    assert settings.prediction_log.url == "postgresql+psycopg://u:p@db/predictions"
    assert settings.admin_token == "t0ken"
    assert "t0ken" not in repr(settings)


def test_router_config_variable_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "elsewhere.yaml"
    path.write_text(yaml.safe_dump({"model": {"name": "from-env"}}))
    assert load_settings(env={"ROUTER_CONFIG": str(path)}).model.name == "from-env"
    with pytest.raises(ConfigError, match=r"missing\.yaml"):
        load_settings(tmp_path / "missing.yaml", env={})


def test_the_server_refuses_to_start_on_a_bad_config_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"model": {"name": "m"}, "routing": {"challenger_wieght": 0.2}}))
    result = subprocess.run(
        [sys.executable, "-m", "router", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        check=False,
    )
    assert result.returncode == 2
    assert "routing.challenger_wieght: unknown key" in result.stderr
    assert "Traceback" not in result.stderr
