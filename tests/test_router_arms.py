"""End to end: which arm answers, under real uvicorn on 127.0.0.1 against real MLflow registries.

Covers the split ratio, sticky assignment (across restarts and salts), shadow mode, a failing
challenger, a failing champion, a missing challenger, a challenger that cannot load, the
missing-champion fallbacks (legacy ``Production`` stage, else the latest version) and a registry
with no versions at start-up.
The prediction log is a SQLite file in ``tmp_path``; the app's lifespan flushes it on exit, so
rows are counted after the server has stopped (or polled for while it runs).
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from demo.data import FEATURES
from router.assignment import assign
from router.config import Settings
from router.logschema import hash_routing_key
from router.server.app import create_app
from tests.conftest import FreshRegistry, MlflowRegistry, RunningRouter, RunningServer
from tests.live_router import (
    RouterDir,
    arm_of,
    http_client,
    query_log,
    router_settings,
    split_body,
    transition_to_production,
    wait_key_secret,
    wait_ready,
    wait_until,
)
from tests.metrics_text import scrape
from tests.pyfunc_models import ConstantModel, FailingModel, register_in, register_pyfunc


def _invoke(client: httpx.Client, body: dict[str, Any], **headers: str) -> httpx.Response:
    response = client.post("/invocations", json=body, headers=headers)
    if response.status_code == 200:
        # The headers and the body tell the same story.
        payload = response.json()
        assert response.headers["X-Arm"] == payload["arm"]
        assert response.headers["X-Model-Version"] == payload["model_version"]
        assert response.headers["X-Request-Id"] == payload["request_id"]
    return response


def test_split_ratio_without_routing_key_follows_the_weight(
    mlflow_registry: MlflowRegistry, running_router: RunningRouter, router_dir: RouterDir
) -> None:
    n, weight = 400, 0.3
    settings = router_dir.settings(mlflow_registry, routing={"challenger_weight": weight})
    body = split_body(mlflow_registry.holdout.head(1))
    served: Counter[str] = Counter()
    with running_router(settings) as client:
        wait_key_secret(client)  # the hashes below are checked
        for _ in range(n):
            response = _invoke(client, body)
            assert response.status_code == 200, response.text
            arm = response.json()["arm"]
            assert response.json()["model_version"] == mlflow_registry.versions[arm]
            served[arm] += 1
        metrics = scrape(client)

    sigma = math.sqrt(n * weight * (1 - weight))
    assert abs(served["challenger"] - n * weight) <= 5 * sigma, served
    assert served["champion"] + served["challenger"] == n
    for arm in ("champion", "challenger"):
        version = mlflow_registry.versions[arm]
        assert metrics.total("router_requests_total", arm=arm, status="ok") == served[arm]
        assert metrics.total("router_requests_total", arm=arm, model_version=version) == served[arm]
    assert metrics.total("router_arm_weight", arm="challenger") == pytest.approx(weight)
    assert metrics.total("router_arm_weight", arm="champion") == pytest.approx(1 - weight)

    logged = dict(router_dir.log_rows("SELECT arm, count(*) FROM predictions GROUP BY arm"))
    assert logged == dict(served)
    assert router_dir.log_rows("SELECT DISTINCT experiment_id FROM predictions") == [
        (f"{mlflow_registry.model_name}:v1-vs-v2",)
    ]


def _sticky_arms(
    running_router: RunningRouter, settings: Settings, body: dict[str, Any], keys: list[str]
) -> dict[str, str]:
    """Each key's arm on a freshly started router; every key is sent twice."""
    arms: dict[str, str] = {}
    with running_router(settings) as client:
        wait_key_secret(client)  # the hashes below are checked
        for _ in range(2):
            for key in keys:
                response = _invoke(client, body, **{"X-Routing-Key": key})
                assert response.status_code == 200, response.text
                arm = response.json()["arm"]
                assert arms.setdefault(key, arm) == arm, f"key {key!r} moved between requests"
    return arms


def test_routing_key_is_sticky_across_restarts_and_a_new_salt_reshuffles(
    mlflow_registry: MlflowRegistry, running_router: RunningRouter, tmp_path: Path
) -> None:
    keys = [f"customer-{i:04d}" for i in range(40)]
    body = split_body(mlflow_registry.holdout.head(1))

    def settings(salt: str, log_name: str) -> Settings:
        return router_settings(
            mlflow_registry,
            tmp_path / log_name,
            routing={"challenger_weight": 0.5, "salt": salt},
        )

    def expected(salt: str) -> dict[str, str]:
        rng = random.Random(0)  # never drawn from: every request carries a key
        return {key: assign(key, salt, 0.5, True, rng).arm for key in keys}

    first = _sticky_arms(running_router, settings("salt-a", "first.db"), body, keys)
    restarted = _sticky_arms(running_router, settings("salt-a", "restarted.db"), body, keys)
    resalted = _sticky_arms(running_router, settings("salt-b", "resalted.db"), body, keys)

    assert first == restarted == expected("salt-a")
    assert set(first.values()) == {"champion", "challenger"}
    assert resalted == expected("salt-b")
    assert sum(first[k] != resalted[k] for k in keys) > 0, "a new salt moved no key"

    # The log keeps a keyed hash of each key (under the secret kept in that log), never the key.
    first_log = f"sqlite:///{tmp_path / 'first.db'}"
    stored = query_log(first_log, "SELECT DISTINCT routing_key_hash FROM predictions")
    [(secret,)] = query_log(first_log, "SELECT value FROM router_secrets")
    assert {h for (h,) in stored} == {hash_routing_key(secret.encode(), k) for k in keys}
    raw = query_log(
        f"sqlite:///{tmp_path / 'first.db'}",
        "SELECT count(*) FROM predictions WHERE routing_key_hash LIKE 'customer-%'",
    )
    assert raw == [(0,)]


def test_shadow_mode_answers_from_the_champion_and_logs_the_challenger_as_shadow(
    mlflow_registry: MlflowRegistry, running_router: RunningRouter, router_dir: RouterDir
) -> None:
    settings = router_dir.settings(
        mlflow_registry,
        routing={"mode": "shadow", "challenger_weight": 0.5},
    )
    holdout = mlflow_registry.holdout
    sent: dict[str, int] = {}  # request id -> rows
    with running_router(settings) as client:
        wait_key_secret(client)  # the hashes below are checked
        for i in range(30):
            n_rows = 1 + i % 3
            request_id = f"shadow-{i:03d}"
            response = _invoke(
                client, split_body(holdout.iloc[i : i + n_rows]), **{"X-Request-Id": request_id}
            )
            assert response.status_code == 200, response.text
            assert response.json()["arm"] == "champion"
            assert response.json()["model_version"] == mlflow_registry.versions["champion"]
            assert response.json()["request_id"] == request_id
            sent[request_id] = n_rows

        challenger_version = mlflow_registry.versions["challenger"]
        metrics = wait_until(
            lambda: (
                (m := scrape(client)).total(
                    "router_requests_total", arm="shadow", model_version=challenger_version
                )
                >= len(sent)
                and m
            ),
            "every request to be scored in shadow",
        )
        assert metrics.total("router_requests_total", arm="shadow", status="ok") == len(sent)
        assert metrics.total("router_requests_total", arm="challenger") == 0
        assert metrics.total("router_arm_weight", arm="challenger") == 0.0
        assert metrics.total("router_fallback_total") == 0

        def shadow_rows() -> list[tuple[Any, ...]]:
            return router_dir.log_rows(
                "SELECT request_id, row_index, model_version, status FROM predictions "
                "WHERE arm = 'shadow' ORDER BY request_id, row_index",
            )

        rows = wait_until(
            lambda: len(r := shadow_rows()) == sum(sent.values()) and r,
            "every shadow row in the prediction log",
        )
        experiment = client.get("/experiment").json()

    expected = [
        (rid, i, challenger_version, "ok") for rid, n in sorted(sent.items()) for i in range(n)
    ]
    assert rows == expected
    champion_rows = router_dir.log_rows(
        "SELECT request_id, row_index FROM predictions WHERE arm = 'champion' "
        "ORDER BY request_id, row_index",
    )
    assert champion_rows == [(rid, i) for rid, i, _, _ in expected]
    assert experiment["mode"] == "shadow"
    assert arm_of(experiment, "champion")["weight"] == 1.0  # type: ignore[index]
    shadow = arm_of(experiment, "shadow")
    assert shadow is not None and shadow["version"] == challenger_version
    assert shadow["weight"] == 0.0


def test_failing_challenger_falls_back_to_the_champion_and_its_circuit_opens(
    fresh_registry: FreshRegistry, running_router: RunningRouter, router_dir: RouterDir
) -> None:
    registry = fresh_registry()
    failing = register_in(registry, FailingModel("challenger exploded"), alias="challenger")
    failures = 4
    settings = router_dir.settings(
        registry,
        routing={
            "challenger_weight": 1.0,
            "breaker_failures": failures,
            "breaker_cooldown_s": 3600,
        },
    )
    champion = registry.versions["champion"]
    body = split_body(registry.holdout.head(2))
    n = 20
    with running_router(settings) as client:
        wait_key_secret(client)  # the hashes below are checked
        for i in range(n):
            response = _invoke(client, body, **{"X-Request-Id": f"fb-{i:02d}"})
            assert response.status_code == 200, response.text
            assert response.json()["arm"] == "champion"
            assert response.json()["model_version"] == champion
            assert len(response.json()["predictions"]) == 2
        metrics = scrape(client)
        experiment = client.get("/experiment").json()

    # The first `failures` requests tried the challenger; then its circuit opened.
    assert metrics.total("router_fallback_total", reason="error") == failures
    assert metrics.total("router_fallback_total", reason="circuit_open") == n - failures
    assert metrics.total("router_challenger_circuit_open") == 1
    assert experiment["challenger_circuit"]["state"] == "open"
    # Intent-to-treat: every request counts once, in its assigned arm, never as the champion's.
    assert (
        metrics.total(
            "router_requests_total", arm="challenger", model_version=failing, status="fallback"
        )
        == n
    )
    assert metrics.total("router_requests_total", arm="champion") == 0
    assert metrics.total("router_requests_total", status="error") == 0

    rows = router_dir.log_rows(
        "SELECT arm, model_version, status, reason, count(*), count(DISTINCT request_id) "
        "FROM predictions GROUP BY arm, model_version, status, reason ORDER BY reason",
    )
    # One row per input row, in the challenger's arm, carrying the champion's served answer.
    assert rows == [
        ("challenger", champion, "fallback", "circuit_open", 2 * (n - failures), n - failures),
        ("challenger", champion, "fallback", "error", 2 * failures, failures),
    ]
    scored = router_dir.log_rows("SELECT count(*) FROM predictions WHERE score IS NULL")
    assert scored == [(0,)]


def test_champion_fault_is_a_500_json_error_and_counted(
    fresh_registry: FreshRegistry, running_router: RunningRouter, router_dir: RouterDir
) -> None:
    registry = fresh_registry()
    failing = register_in(registry, FailingModel("secret internal detail"), alias="champion")
    settings = router_dir.settings(registry, routing={"challenger_weight": 0.0})
    n = 5
    with running_router(settings) as client:
        wait_key_secret(client)  # the hashes below are checked
        for i in range(n):
            response = _invoke(
                client, split_body(registry.holdout.head(1)), **{"X-Request-Id": f"cf-{i}"}
            )
            assert response.status_code == 500
            assert response.headers["content-type"] == "application/json"
            error = response.json()["error"]
            assert error["code"] == "prediction_failed"
            assert failing in error["message"]
            for leak in ("Traceback", "RuntimeError", "secret internal detail"):
                assert leak not in response.text
        metrics = scrape(client)
        assert client.get("/readyz").status_code == 200  # loaded, just failing

    assert (
        metrics.total(
            "router_requests_total", arm="champion", model_version=failing, status="error"
        )
        == n
    )
    assert metrics.total("router_requests_total", status="ok") == 0
    assert router_dir.log_rows(
        "SELECT arm, model_version, status, count(*) FROM predictions GROUP BY 1, 2, 3"
    ) == [("champion", failing, "error", n)]


def test_missing_challenger_alias_serves_all_traffic_from_the_champion(
    fresh_registry: FreshRegistry, running_router: RunningRouter, router_dir: RouterDir
) -> None:
    registry = fresh_registry()
    registry.client().delete_registered_model_alias(registry.model_name, "challenger")
    settings = router_dir.settings(registry, routing={"challenger_weight": 0.5})
    champion = registry.versions["champion"]
    body = split_body(registry.holdout.head(1))
    with running_router(settings) as client:
        wait_key_secret(client)  # the hashes below are checked
        experiment = client.get("/experiment").json()
        arms: Counter[tuple[str, str]] = Counter()
        for i in range(40):
            # Half of these keys would go to the challenger if there were one.
            response = _invoke(client, body, **{"X-Routing-Key": f"user-{i}"})
            assert response.status_code == 200, response.text
            arms[(response.json()["arm"], response.json()["model_version"])] += 1
        metrics = scrape(client)

    assert arms == {("champion", champion): 40}
    assert "challenger" in experiment["challenger_missing"]
    assert [a["arm"] for a in experiment["arms"]] == ["champion"]
    assert experiment["arms"][0]["weight"] == 1.0
    assert experiment["experiment_id"] == f"{registry.model_name}:v{champion}-vs-vnone"
    assert metrics.total("router_requests_total", arm="champion", status="ok") == 40
    assert not metrics.has("router_requests_total", arm="challenger")
    assert not metrics.has("router_model_info", arm="challenger")


def test_challenger_that_cannot_load_leaves_the_champion_serving_alone(
    fresh_registry: FreshRegistry, running_router: RunningRouter, router_dir: RouterDir
) -> None:
    registry = fresh_registry()
    client_ = registry.client()
    challenger = registry.versions["challenger"]
    artifacts = Path(client_.get_model_version_download_uri(registry.model_name, challenger))
    (artifacts / "model.skops").write_bytes(b"not a zip archive")  # corrupt, not missing
    settings = router_dir.settings(registry, routing={"challenger_weight": 0.5})
    champion = registry.versions["champion"]
    with running_router(settings) as client:
        assert wait_ready(client)["champion_version"] == champion
        experiment = client.get("/experiment").json()
        versions = {
            _invoke(
                client, split_body(registry.holdout.head(1)), **{"X-Routing-Key": f"k{i}"}
            ).json()["model_version"]
            for i in range(20)
        }
        metrics = scrape(client)

    assert versions == {champion}
    assert [a["arm"] for a in experiment["arms"]] == ["champion"]
    assert "challenger_missing" in experiment
    assert metrics.total("router_model_reloads_total", arm="challenger", result="error") >= 1


def test_missing_champion_alias_falls_back_to_the_production_stage(
    fresh_registry: FreshRegistry,
    running_router: RunningRouter,
    router_dir: RouterDir,
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = fresh_registry()
    registry.client().delete_registered_model_alias(registry.model_name, "champion")
    in_production = registry.versions["champion"]  # v1: not the latest (v2 is)
    transition_to_production(registry, in_production)
    settings = router_dir.settings(registry, routing={"challenger_weight": 0.0})
    with (
        caplog.at_level(logging.WARNING, logger="router.registry"),
        running_router(settings) as client,
    ):
        assert wait_ready(client)["champion_version"] == in_production
        experiment = client.get("/experiment").json()
        response = _invoke(client, split_body(registry.holdout.head(1)))

    champion = arm_of(experiment, "champion")
    assert champion is not None
    assert (champion["version"], champion["resolved_via"]) == (in_production, "stage:Production")
    challenger = arm_of(experiment, "challenger")
    assert challenger is not None and challenger["resolved_via"] == "alias"
    assert response.status_code == 200
    assert response.headers["X-Model-Version"] == in_production
    assert "Production stage" in caplog.text


def test_missing_champion_alias_without_production_is_not_ready_and_says_how_to_set_it(
    fresh_registry: FreshRegistry, running_server: RunningServer, router_dir: RouterDir
) -> None:
    """No @champion (a typo in ``champion_alias``, or the alias never set) and no version in
    Production: nobody chose a version to serve, so none is served (the latest is typically the
    untested challenger); /readyz says why and how to fix it, until the alias is set."""
    registry = fresh_registry()
    client_ = registry.client()
    client_.delete_registered_model_alias(registry.model_name, "champion")
    latest = registry.versions["challenger"]  # v2, still @challenger
    settings = router_dir.settings(
        registry,
        model={"startup_retry_interval_s": 0.1},
        routing={"challenger_weight": 0.0},
    )
    with running_server(create_app(settings)) as url, http_client(url) as client:
        not_ready = wait_until(
            lambda: (
                (r := client.get("/readyz")).status_code == 503
                and "@champion" in (r.json().get("reason") or "")
                and r
            ),
            "/readyz to say why it is not ready",
        )
        refused = client.post("/invocations", json=split_body(registry.holdout.head(1)))
        client_.set_registered_model_alias(
            registry.model_name, "champion", registry.versions["champion"]
        )
        ready = wait_ready(client)

    reason = not_ready.json()["reason"]
    assert "no @champion alias" in reason and "set_registered_model_alias" in reason
    assert refused.status_code == 503
    assert ready["champion_version"] == registry.versions["champion"] != latest


def test_registry_without_versions_is_not_ready_until_one_is_registered(
    fresh_registry: FreshRegistry, running_server: RunningServer, router_dir: RouterDir
) -> None:
    registry = fresh_registry()
    name = "empty-model"
    registry.client().create_registered_model(name)
    settings = router_dir.settings(
        registry,
        model={"name": name, "startup_retry_interval_s": 0.1},
    )
    with running_server(create_app(settings)) as url, http_client(url) as client:
        not_ready = wait_until(
            lambda: (
                (r := client.get("/readyz")).status_code == 503
                and "no versions" in (r.json().get("reason") or "")
                and r
            ),
            "/readyz to say why it is not ready",
        )
        assert name in not_ready.json()["reason"]
        refused = client.post("/invocations", json=split_body(registry.holdout.head(1)))
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "not_ready"
        experiment = client.get("/experiment").json()
        assert experiment["ready"] is False and experiment["arms"] == []
        assert scrape(client).total("router_ready") == 0

        version = register_pyfunc(
            registry.tracking_uri, name, ConstantModel(0.8), registry.holdout[FEATURES]
        )
        # A version alone is not chosen to serve: the router stays unready until @champion is set.
        wait_until(
            lambda: "no @champion alias" in (client.get("/readyz").json().get("reason") or ""),
            "/readyz to ask for the @champion alias",
        )
        registry.client().set_registered_model_alias(name, "champion", version)
        assert wait_ready(client)["champion_version"] == version
        response = _invoke(client, split_body(registry.holdout.head(2)))
        experiment = client.get("/experiment").json()
        assert scrape(client).total("router_ready") == 1

    assert response.status_code == 200
    assert response.json()["predictions"] == [pytest.approx([0.2, 0.8])] * 2
    champion = arm_of(experiment, "champion")
    assert champion is not None and champion["resolved_via"] == "alias"
