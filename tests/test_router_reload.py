"""End to end: hot reload of registry aliases and the admin endpoints, on a live router.

Aliases are moved with ``MlflowClient`` while a real uvicorn server runs (``poll_interval_s`` 0.2);
the tests wait for the new state by polling ``/experiment`` and ``/metrics`` and never restart it.
"""

from __future__ import annotations

import random
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from mlflow.pyfunc.model import PythonModel

from demo.data import FEATURES
from router.assignment import assign
from tests.conftest import FreshRegistry, MlflowRegistry, RunningRouter
from tests.live_router import (
    RouterDir,
    arm_of,
    http_client,
    split_body,
    transition_to_production,
    wait_ready,
    wait_until,
)
from tests.metrics_text import scrape
from tests.pyfunc_models import BlockingModel, ConstantModel, register_in, register_pyfunc

POLL_S = 0.2
TOKEN = "t0ken"


class SlowLoadingModel(PythonModel):
    """Loads only once the test lets it: ``load_context`` creates ``<gate_dir>/loading``, then
    waits (bounded) for ``<gate_dir>/release``. Predicts ``[0.5, 0.5]`` per row."""

    def __init__(self, gate_dir: str) -> None:
        self.gate_dir = gate_dir

    def load_context(self, context: object) -> None:
        gate = Path(self.gate_dir)
        (gate / "loading").touch()
        deadline = time.monotonic() + 60.0
        while not (gate / "release").exists():
            if time.monotonic() > deadline:
                raise TimeoutError("SlowLoadingModel: never released")
            time.sleep(0.01)

    def predict(
        self, context: object, model_input: pd.DataFrame, params: dict[str, object] | None = None
    ) -> np.ndarray:
        return np.tile(np.array([0.5, 0.5]), (len(model_input), 1))


def _champion(client: Any) -> dict[str, Any]:
    champion = arm_of(client.get("/experiment").json(), "champion")
    assert champion is not None
    return champion


def test_moving_the_champion_alias_is_picked_up_without_a_restart(
    fresh_registry: FreshRegistry, running_router: RunningRouter, router_dir: RouterDir
) -> None:
    registry = fresh_registry()
    old, new = registry.versions["champion"], registry.versions["challenger"]
    settings = router_dir.settings(
        registry,
        model={"poll_interval_s": POLL_S},
        routing={"challenger_weight": 0.0},
    )
    body = split_body(registry.holdout.head(3))
    with running_router(settings) as client:
        before = client.get("/experiment").json()
        first = client.post("/invocations", json=body, headers={"X-Request-Id": "before"})
        assert first.headers["X-Model-Version"] == old

        # A promotion: @champion moves to the challenger's version.
        registry.client().set_registered_model_alias(registry.model_name, "champion", new)
        wait_until(lambda: _champion(client)["version"] == new, f"@champion v{new} in service")

        after = client.get("/experiment").json()
        second = client.post("/invocations", json=body, headers={"X-Request-Id": "after"})
        metrics = scrape(client)

    assert second.status_code == 200
    assert (second.json()["arm"], second.headers["X-Model-Version"]) == ("champion", new)
    assert second.json()["predictions"] != first.json()["predictions"]  # another model answers
    assert before["experiment_id"] == f"{registry.model_name}:v{old}-vs-v{new}"
    # Both aliases on one version: nothing left to compare, so a new experiment, champion only.
    assert after["experiment_id"] == f"{registry.model_name}:v{new}-vs-vnone"
    assert metrics.total("router_model_reloads_total", arm="champion", result="ok") == 1
    assert metrics.total("router_model_reloads_total", result="error") == 0
    assert metrics.total("router_model_info", arm="champion", model_version=new) == 1
    assert not metrics.has("router_model_info", arm="champion", model_version=old)
    logged = router_dir.log_rows(
        "SELECT DISTINCT request_id, model_version, experiment_id FROM predictions "
        "ORDER BY request_id DESC",
    )
    assert logged == [
        ("before", old, before["experiment_id"]),
        ("after", new, after["experiment_id"]),
    ]


def test_in_flight_request_finishes_on_the_model_it_started_with(
    fresh_registry: FreshRegistry,
    running_router: RunningRouter,
    tmp_path: Path,
    router_dir: RouterDir,
) -> None:
    registry = fresh_registry()
    gate = tmp_path / "gate"
    gate.mkdir()
    (gate / "release").touch()  # MLflow calls predict on the input example while logging
    gated = register_in(registry, BlockingModel(str(gate)), alias="champion")
    for name in ("release", "started"):
        (gate / name).unlink(missing_ok=True)
    settings = router_dir.settings(
        registry,
        model={"poll_interval_s": POLL_S},
        routing={"challenger_weight": 0.0},
    )
    next_champion = registry.versions["champion"]
    body = split_body(registry.holdout.head(1))
    with (
        running_router(settings) as client,
        ThreadPoolExecutor(max_workers=1) as pool,
    ):
        assert wait_ready(client)["champion_version"] == gated
        old_experiment = client.get("/experiment").json()["experiment_id"]

        def slow_request() -> Any:
            with http_client(str(client.base_url)) as own:
                return own.post("/invocations", json=body, headers={"X-Request-Id": "in-flight"})

        in_flight = pool.submit(slow_request)
        wait_until(lambda: (gate / "started").exists(), "the gated request to reach its model")

        registry.client().set_registered_model_alias(registry.model_name, "champion", next_champion)
        wait_until(
            lambda: _champion(client)["version"] == next_champion, "the new champion in service"
        )
        # The new champion answers while the old one still holds its request.
        meanwhile = client.post("/invocations", json=body)
        assert not in_flight.done()
        (gate / "release").touch()
        slow = in_flight.result(timeout=60)

    assert meanwhile.headers["X-Model-Version"] == next_champion
    assert slow.status_code == 200, slow.text
    assert slow.headers["X-Model-Version"] == gated
    assert slow.json()["predictions"] == [[0.5, 0.5]]
    logged = router_dir.log_rows(
        "SELECT model_version, experiment_id FROM predictions WHERE request_id = 'in-flight'",
    )
    assert logged == [(gated, old_experiment)]


def test_moving_only_the_challenger_reloads_only_the_challenger(
    fresh_registry: FreshRegistry, running_router: RunningRouter, router_dir: RouterDir
) -> None:
    registry = fresh_registry()
    name, champion = registry.model_name, registry.versions["champion"]
    settings = router_dir.settings(registry, model={"poll_interval_s": POLL_S})
    with running_router(settings) as client:
        new = register_pyfunc(
            registry.tracking_uri, name, ConstantModel(0.7), registry.holdout[FEATURES]
        )
        registry.client().set_registered_model_alias(name, "challenger", new)
        experiment = wait_until(
            lambda: (
                (e := client.get("/experiment").json())["experiment_id"]
                == f"{name}:v{champion}-vs-v{new}"
                and e
            ),
            "the new challenger in service",
        )
        metrics = scrape(client)

    assert arm_of(experiment, "challenger")["version"] == new  # type: ignore[index]
    assert metrics.total("router_model_reloads_total", arm="challenger", result="ok") == 1
    # The champion did not change: it was not reloaded, and is not counted as if it were.
    assert metrics.total("router_model_reloads_total", arm="champion") == 0


def test_setting_the_missing_champion_alias_on_the_served_version_updates_resolved_via(
    fresh_registry: FreshRegistry, running_router: RunningRouter, router_dir: RouterDir
) -> None:
    registry = fresh_registry()
    client_, name = registry.client(), registry.model_name
    client_.delete_registered_model_alias(name, "champion")
    client_.delete_registered_model_alias(name, "challenger")
    latest = registry.versions["challenger"]
    transition_to_production(registry, latest)
    settings = router_dir.settings(registry, model={"poll_interval_s": POLL_S})
    with running_router(settings) as client:
        assert (_champion(client)["version"], _champion(client)["resolved_via"]) == (
            latest,
            "stage:Production",
        )
        client_.set_registered_model_alias(name, "champion", latest)
        wait_until(
            lambda: _champion(client)["resolved_via"] == "alias",
            "/experiment to say the champion is now found by its alias",
        )
        champion = _champion(client)
        metrics = scrape(client)

    assert champion["version"] == latest
    # Same version, same model object: nothing was reloaded.
    assert metrics.total("router_model_reloads_total") == 0


def test_shutdown_does_not_wait_for_a_model_load_in_progress(
    fresh_registry: FreshRegistry,
    running_router: RunningRouter,
    tmp_path: Path,
    router_dir: RouterDir,
) -> None:
    """A reload stuck in a slow load (a big model, a registry timing out) must not hold up the
    shutdown, and with it the prediction log's flush: an orchestrator kills slow shutdowns."""
    registry = fresh_registry()
    gate = tmp_path / "gate"
    gate.mkdir()
    (gate / "release").touch()  # MLflow loads the model while logging it
    slow = register_in(registry, SlowLoadingModel(str(gate)))
    for name in ("release", "loading"):
        (gate / name).unlink(missing_ok=True)
    settings = router_dir.settings(
        registry,
        model={"poll_interval_s": POLL_S},
        routing={"challenger_weight": 0.0},
    )
    body = split_body(registry.holdout.head(2))
    try:
        with running_router(settings) as client:
            for i in range(20):
                response = client.post("/invocations", json=body, headers={"X-Request-Id": f"{i}"})
                assert response.status_code == 200
            registry.client().set_registered_model_alias(registry.model_name, "champion", slow)
            wait_until(lambda: (gate / "loading").exists(), "the reload to start loading")
        # The server has stopped (lifespan shutdown included) while the load is still stuck.
        assert not (gate / "release").exists()
        logged = router_dir.log_rows("SELECT count(*) FROM predictions")
        assert logged == [(40,)]
    finally:
        (gate / "release").touch()  # let the abandoned load finish


def _break_artifacts(registry: MlflowRegistry, version: str, how: str) -> None:
    client = registry.client()
    path = Path(client.get_model_version_download_uri(registry.model_name, version))
    if how == "deleted":
        shutil.rmtree(path)
    else:  # corrupted: the files are there, the model inside is garbage
        (path / "model.skops").write_bytes(b"this is not a zip archive")


@pytest.mark.parametrize("how", ["deleted", "corrupted"])
def test_failed_load_keeps_the_old_model_and_is_counted(
    how: str, fresh_registry: FreshRegistry, running_router: RunningRouter, router_dir: RouterDir
) -> None:
    registry = fresh_registry()
    client_ = registry.client()
    name = registry.model_name
    client_.delete_registered_model_alias(name, "challenger")  # v2 stays unloaded
    old, broken = registry.versions["champion"], registry.versions["challenger"]
    settings = router_dir.settings(registry, model={"poll_interval_s": POLL_S})
    body = split_body(registry.holdout.head(1))
    with running_router(settings) as client:
        _break_artifacts(registry, broken, how)
        client_.set_registered_model_alias(name, "champion", broken)
        failed = wait_until(
            lambda: (
                (m := scrape(client)).total(
                    "router_model_reloads_total", arm="champion", result="error"
                )
                >= 1
                and m
            ),
            "the failed reload to be counted",
        )
        assert failed.total("router_model_reloads_total", result="ok") == 0
        assert client.get("/readyz").status_code == 200
        assert _champion(client)["version"] == old
        response = client.post("/invocations", json=body)
        assert response.status_code == 200
        assert response.headers["X-Model-Version"] == old

        # The poller survived the failure: a good version is still picked up.
        good = register_pyfunc(
            registry.tracking_uri, name, ConstantModel(0.9), registry.holdout[FEATURES]
        )
        client_.set_registered_model_alias(name, "champion", good)
        wait_until(lambda: _champion(client)["version"] == good, "a good version after the bad")
        recovered = client.post("/invocations", json=body)
        metrics = scrape(client)

    assert recovered.headers["X-Model-Version"] == good
    assert recovered.json()["predictions"] == [pytest.approx([0.1, 0.9])]
    assert metrics.total("router_model_reloads_total", arm="champion", result="ok") == 1


def _auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_admin_endpoints_require_the_bearer_token(
    fresh_registry: FreshRegistry, running_router: RunningRouter, router_dir: RouterDir
) -> None:
    registry = fresh_registry()
    settings = router_dir.settings(
        registry,
        env={"ROUTER_ADMIN_TOKEN": TOKEN},
        routing={"challenger_weight": 0.1},
    )
    with running_router(settings) as client:
        for headers in ({}, _auth("wrong"), {"Authorization": TOKEN}):
            reload_ = client.post("/admin/reload", headers=headers)
            weights = client.put("/admin/weights", json={"challenger_weight": 1.0}, headers=headers)
            for response in (reload_, weights):
                assert response.status_code == 401, response.text
                assert response.json()["error"]["code"] == "unauthorized"
        assert scrape(client).total("router_arm_weight", arm="challenger") == pytest.approx(0.1)

        ok = client.post("/admin/reload", headers=_auth())
        assert ok.status_code == 200
        assert ok.json()["changed"] is False


def _arms_by_key(client: Any, body: dict[str, Any], keys: list[str]) -> dict[str, str]:
    arms = {}
    for key in keys:
        response = client.post("/invocations", json=body, headers={"X-Routing-Key": key})
        assert response.status_code == 200, response.text
        arms[key] = response.json()["arm"]
    return arms


def test_admin_weights_change_the_split_and_the_gauge(
    fresh_registry: FreshRegistry, running_router: RunningRouter, router_dir: RouterDir
) -> None:
    registry = fresh_registry()  # the split of record is written to the registry
    settings = router_dir.settings(
        registry,
        env={"ROUTER_ADMIN_TOKEN": TOKEN},
        routing={"challenger_weight": 0.2},
    )
    salt = settings.routing.salt
    keys = [f"member-{i}" for i in range(40)]
    body = split_body(registry.holdout.head(1))
    rng = random.Random(0)  # never drawn from: every request has a key
    with running_router(settings) as client:
        at_20 = _arms_by_key(client, body, keys)
        assert at_20 == {k: assign(k, salt, 0.2, True, rng).arm for k in keys}

        changed = client.put("/admin/weights", json={"challenger_weight": 0.6}, headers=_auth())
        assert changed.status_code == 200
        assert changed.json()["challenger_weight"] == 0.6
        assert changed.json()["previous"] == 0.2
        at_60 = _arms_by_key(client, body, keys)
        metrics = scrape(client)
        experiment = client.get("/experiment").json()

        for bad, status in (({"challenger_weight": 1.5}, 400), ({"challenger_weight": "x"}, 400)):
            refused = client.put("/admin/weights", json=bad, headers=_auth())
            assert refused.status_code == status, refused.text
        assert scrape(client).total("router_arm_weight", arm="challenger") == pytest.approx(0.6)

        assert client.put(
            "/admin/weights", json={"challenger_weight": 1}, headers=_auth()
        ).is_success
        everyone = _arms_by_key(client, body, keys)

    assert at_60 == {k: assign(k, salt, 0.6, True, rng).arm for k in keys}
    # Raising the weight only moves users from champion to challenger, never back.
    assert all(at_60[k] == "challenger" for k in keys if at_20[k] == "challenger")
    assert sum(a == "challenger" for a in at_60.values()) > sum(
        a == "challenger" for a in at_20.values()
    )
    assert metrics.total("router_arm_weight", arm="challenger") == pytest.approx(0.6)
    assert metrics.total("router_arm_weight", arm="champion") == pytest.approx(0.4)
    assert arm_of(experiment, "challenger")["weight"] == pytest.approx(0.6)  # type: ignore[index]
    assert set(everyone.values()) == {"challenger"}


def test_admin_reload_picks_up_an_alias_move_at_once(
    fresh_registry: FreshRegistry, running_router: RunningRouter, router_dir: RouterDir
) -> None:
    registry = fresh_registry()
    old, new = registry.versions["champion"], registry.versions["challenger"]
    settings = router_dir.settings(
        registry,
        env={"ROUTER_ADMIN_TOKEN": TOKEN},
        routing={"challenger_weight": 0.0},  # poll_interval_s stays at an hour: no polling
    )
    body = split_body(registry.holdout.head(1))
    with running_router(settings) as client:
        registry.client().set_registered_model_alias(registry.model_name, "champion", new)
        reloaded = client.post("/admin/reload", headers=_auth())
        response = client.post("/invocations", json=body)
        again = client.post("/admin/reload", headers=_auth())
        metrics = scrape(client)

    assert reloaded.status_code == 200
    assert reloaded.json() == {
        "changed": True,
        "experiment_id": f"{registry.model_name}:v{new}-vs-vnone",
    }
    assert response.headers["X-Model-Version"] == new != old
    assert again.json()["changed"] is False
    assert metrics.total("router_model_reloads_total", arm="champion", result="ok") == 1
