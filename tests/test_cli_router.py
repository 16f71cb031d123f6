"""End to end: a REJECT from the real CLI ends the experiment on a live router.

The router runs under real uvicorn and polls the registry (``poll_interval_s`` 0.2) with all
traffic on the challenger; ``evaluate_and_promote`` judges a synthetic log of the same experiment
in which the challenger is worse. After the CLI exits 3 the router serves every request from the
champion, without a restart, and its log rows belong to the champion-only experiment.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from experiments.cli import EXIT_NO_EXPERIMENT, evaluate_and_promote_main
from router import logschema
from tests.conftest import FreshRegistry, RunningRouter
from tests.live_router import (
    arm_of,
    query_log,
    router_settings,
    split_body,
    wait_until,
)
from tests.synthlog import Arm, sqlite_url, write_config, write_log

pytestmark = pytest.mark.usefixtures("cli_workdir")  # tests/conftest.py


def test_reject_sends_all_traffic_to_the_champion_within_a_poll(
    fresh_registry: FreshRegistry, running_router: RunningRouter, tmp_path: Path
) -> None:
    registry = fresh_registry()
    champion, challenger = registry.versions["champion"], registry.versions["challenger"]
    eid = logschema.experiment_id(registry.model_name, champion, challenger)
    router_log = tmp_path / "router.db"
    settings = router_settings(
        registry,
        router_log,
        model={"poll_interval_s": 0.2},
        routing={"challenger_weight": 1.0},  # every request the challenger's while it exists
    )
    judged_log = sqlite_url(tmp_path / "judged.db")
    write_log(judged_log, experiment_id=eid, champion=Arm(0.70), challenger=Arm(0.60))
    config = write_config(
        tmp_path / "config.yaml",
        {
            "model": {"name": registry.model_name, "tracking_uri": registry.tracking_uri},
            "prediction_log": {"url": judged_log},
            "routing": {"challenger_weight": 0.5},
        },
    )
    body = split_body(registry.holdout.head(1))

    with running_router(settings) as client:
        before = client.post("/invocations", json=body)
        assert before.headers["X-Arm"] == "challenger"

        assert evaluate_and_promote_main(["--config", str(config)]) == 3

        wait_until(
            lambda: arm_of(client.get("/experiment").json(), "challenger") is None,
            "the router to drop the rejected challenger",
        )
        answers = [
            client.post("/invocations", json=body, headers={"X-Request-Id": f"after-{i}"})
            for i in range(20)
        ]
        assert all(a.status_code == 200 for a in answers)
        assert {(a.headers["X-Arm"], a.headers["X-Model-Version"]) for a in answers} == {
            ("champion", champion)
        }
        experiment = client.get("/experiment").json()
        assert experiment["experiment_id"] == logschema.experiment_id(
            registry.model_name, champion, None
        )
        # The next scheduled evaluation: no experiment running, not an alarm.
        assert evaluate_and_promote_main(["--config", str(config)]) == EXIT_NO_EXPERIMENT

    rows = query_log(
        sqlite_url(router_log),
        "SELECT DISTINCT arm, experiment_id FROM predictions WHERE request_id LIKE 'after-%'",
    )
    assert rows == [("champion", logschema.experiment_id(registry.model_name, champion, None))]
