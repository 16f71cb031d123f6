"""End to end: a ramp driven by the real CLI against two running routers (real uvicorn) that share
one registry and one prediction log.

A better challenger is ramped 5% -> 20% -> 50% (``evaluate_and_promote`` exits 7 twice, the
routers follow each new split within a poll) and promoted at the last stage (exit 0). A failing
challenger is rejected at the first stage, from its errors alone, before any outcome is sent
back (exit 3); every router then gives the challenger weight 0 within a poll.

Outcomes are the test's (``metric: outcome``, a reward): the statistics are not the point here,
the loop is (experiments/simulate_ramp.py measures the rule's error rates).
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from experiments.cli import EXIT_ADVANCED, evaluate_and_promote_main
from router.changes import TAG_PREFIX, tracking_experiment_name
from router.config import load_settings
from router.splitrecord import SPLIT_ACTION
from tests.conftest import FreshRegistry, MlflowRegistry, RunningRouter
from tests.live_router import split_body, wait_until
from tests.metrics_text import scrape
from tests.pyfunc_models import FailingModel, register_in
from tests.synthlog import sqlite_url, write_config

pytestmark = pytest.mark.usefixtures("cli_workdir")  # tests/conftest.py

RAMP = [0.05, 0.2, 0.5]
USERS_PER_STAGE = 400
# Outcomes count within this of their prediction; predictions are judged once it has passed. Long
# enough that an outcome sent right after its answer counts on a loaded machine (at 0.3 s the
# slower challenger's outcomes were sometimes late, and the coverage check called it invalid).
WINDOW_S = 2.0


def _config(registry: MlflowRegistry, tmp_path: Path) -> Path:
    return write_config(
        tmp_path / "config.yaml",
        {
            "model": {
                "name": registry.model_name,
                "tracking_uri": registry.tracking_uri,
                "poll_interval_s": 0.2,
            },
            "prediction_log": {"url": sqlite_url(tmp_path / "predictions.db")},
            # Every fault is counted as one (no breaker opening after five in a row).
            "routing": {"challenger_weight": 0.1, "breaker_failures": 1000},
            "experiment": {
                "metric": "outcome",
                "ramp": RAMP,
                "ramp_stage_min_s": 0,
                "min_samples_per_arm": 10,
                "outcome_window_s": WINDOW_S,
                "planned_samples": 1000,
                # Gradient boosting is slower than the logistic regression; not the point here.
                "guardrails": {"max_latency_p95_increase": 100.0},
            },
        },
    )


@pytest.fixture
def routers(running_router: RunningRouter, tmp_path: Path) -> Iterator[Any]:
    """``routers(config)``: two ready routers on ``config``; yields their clients."""
    stack = ExitStack()

    def start(config: Path) -> list[httpx.Client]:
        settings = load_settings(config, env={})
        return [stack.enter_context(running_router(settings)) for _ in range(2)]

    with stack:
        yield start


def _splits(clients: list[httpx.Client]) -> list[float]:
    return [c.get("/experiment").json()["split"]["challenger_weight"] for c in clients]


def _send_stage(
    clients: list[httpx.Client], body: dict[str, Any], stage: int, rng: random.Random
) -> dict[str, int]:
    """One request per new user, spread over both routers; the challenger's answers are worth 1
    nine times in ten, the champion's one time in two."""
    served = {"champion": 0, "challenger": 0}
    for i in range(USERS_PER_STAGE):
        client = clients[i % 2]
        answer = client.post(
            "/invocations", json=body, headers={"X-Routing-Key": f"stage{stage}-user{i}"}
        )
        assert answer.status_code == 200, answer.text
        arm = answer.headers["X-Arm"]
        served[arm] += 1
        reward = int(rng.random() < (0.9 if arm == "challenger" else 0.5))
        outcome = {"request_id": answer.json()["request_id"], "outcome": reward}
        assert client.post("/feedback", json=outcome).status_code == 200
    time.sleep(WINDOW_S * 2)  # the predictions mature (the evaluator's cut-off is now - window)
    return served


def _runs(registry: MlflowRegistry, action: str) -> int:
    client = registry.client()
    found = client.get_experiment_by_name(tracking_experiment_name(registry.model_name))
    assert found is not None
    query = f"tags.`{TAG_PREFIX}action` = '{action}'"
    return len(client.search_runs([found.experiment_id], query))


def test_a_better_challenger_is_ramped_then_promoted(
    fresh_registry: FreshRegistry, routers: Any, tmp_path: Path
) -> None:
    registry = fresh_registry()
    champion, challenger = registry.versions["champion"], registry.versions["challenger"]
    config = _config(registry, tmp_path)
    clients = routers(config)
    body = split_body(registry.holdout.head(1))
    rng = random.Random(0)
    codes = []
    for stage, weight in enumerate(RAMP):
        # The experiment starts at the first stage; each later one within a poll of the CLI's move.
        wait_until(lambda w=weight: _splits(clients) == [w, w], f"every router at {weight}")
        served = _send_stage(clients, body, stage, rng)
        assert served["challenger"] >= 10, served
        if stage == 0:
            dry = evaluate_and_promote_main(["--config", str(config), "--dry-run"])
            assert dry == EXIT_ADVANCED
            assert _splits(clients) == [weight, weight]  # --dry-run moves nothing
        codes.append(evaluate_and_promote_main(["--config", str(config)]))
    assert codes == [EXIT_ADVANCED, EXIT_ADVANCED, 0]

    new_experiment = f"{registry.model_name}:v{challenger}-vs-vnone"
    wait_until(
        lambda: all(
            c.get("/experiment").json()["experiment_id"] == new_experiment for c in clients
        ),
        "every router to serve the promoted version alone",
    )
    aliases = registry.client().get_registered_model(registry.model_name).aliases
    assert {k: str(v) for k, v in aliases.items()} == {"champion": challenger, "rollback": champion}
    # Each move is audited: the evaluation's run and the split change's own run.
    assert _runs(registry, "advanced") == 2
    assert _runs(registry, SPLIT_ACTION) == 2
    assert _runs(registry, "promoted") == 1


def test_a_failing_challenger_is_rejected_at_the_first_stage(
    fresh_registry: FreshRegistry, routers: Any, tmp_path: Path
) -> None:
    registry = fresh_registry()
    register_in(registry, FailingModel(), alias="challenger")
    config = _config(registry, tmp_path)
    clients = routers(config)
    body = split_body(registry.holdout.head(1))
    wait_until(lambda: _splits(clients) == [RAMP[0], RAMP[0]], "the first stage everywhere")
    for i in range(USERS_PER_STAGE):  # no feedback at all: the errors alone decide
        answer = clients[i % 2].post("/invocations", json=body, headers={"X-Routing-Key": f"u{i}"})
        assert answer.status_code == 200, answer.text  # the champion answers for it

    assert evaluate_and_promote_main(["--config", str(config)]) == 3

    def zero_everywhere() -> bool:
        return _splits(clients) == [0.0, 0.0] and all(
            scrape(c).total("router_arm_weight", arm="challenger") == 0.0 for c in clients
        )

    wait_until(zero_everywhere, "challenger weight 0 on every router")
    arms = {
        clients[i % 2]
        .post("/invocations", json=body, headers={"X-Routing-Key": f"u{i}"})
        .headers["X-Arm"]
        for i in range(50)
    }
    assert arms == {"champion"}
    assert "challenger" not in registry.client().get_registered_model(registry.model_name).aliases
