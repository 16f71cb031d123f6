"""The champion's score on every logged row, the evaluator's covariate (real registry, uvicorn):
challenger-served inputs are scored by the champion after the response, champion rows carry the
score served, and under load the scoring is skipped, counted, and the rows still written."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import pytest

from demo.data import FEATURES
from tests.conftest import FreshRegistry, RunningRouter
from tests.live_router import RouterDir, keys_for, split_body, wait_until
from tests.metrics_text import scrape
from tests.pyfunc_models import BlockingModel, ConstantModel, register_in

SALT = "covariate-tests"


def _post(client: httpx.Client, body: object, key: str, request_id: str) -> httpx.Response:
    return client.post(
        "/invocations", json=body, headers={"X-Routing-Key": key, "X-Request-Id": request_id}
    )


def test_challenger_rows_carry_the_champions_score_of_the_same_input(
    fresh_registry: FreshRegistry, running_router: RunningRouter, router_dir: RouterDir
) -> None:
    registry = fresh_registry()  # champion: logistic regression; challenger: gradient boosting
    settings = router_dir.settings(registry, routing={"challenger_weight": 0.5, "salt": SALT})
    rows = registry.holdout[FEATURES].head(6).reset_index(drop=True)
    to_challenger = keys_for("challenger", 6, salt=SALT, weight=0.5)
    to_champion = keys_for("champion", 6, salt=SALT, weight=0.5)
    with running_router(settings) as client:
        for i in range(6):
            body = split_body(rows.iloc[[i]])
            assert _post(client, body, to_challenger[i], f"ch-{i}").json()["arm"] == "challenger"
            assert _post(client, body, to_champion[i], f"cp-{i}").json()["arm"] == "champion"
        wait_until(
            lambda: router_dir.log_rows("SELECT count(*) FROM predictions")[0][0] == 12,
            "12 logged rows",
        )
        metrics = scrape(client)

    logged = {
        rid: (arm, score, champion_score)
        for rid, arm, score, champion_score in router_dir.log_rows(
            "SELECT request_id, arm, score, champion_score FROM predictions"
        )
    }
    for i in range(6):
        _, champion_served, champion_row_covariate = logged[f"cp-{i}"]
        _, challenger_served, challenger_row_covariate = logged[f"ch-{i}"]
        # A champion row's covariate is its served score; a challenger row's is the champion's
        # score of the same input, not the challenger's own answer.
        assert champion_row_covariate == champion_served
        assert challenger_row_covariate == pytest.approx(champion_served, abs=1e-12)
        assert challenger_row_covariate != pytest.approx(challenger_served, abs=1e-6)
    assert metrics.total("router_covariate_scorings_total", result="scored") == 6
    assert metrics.total("router_covariate_scorings_total", result="skipped") == 0


def test_a_busy_champion_skips_the_covariate_and_the_rows_are_still_written(
    fresh_registry: FreshRegistry,
    running_router: RunningRouter,
    router_dir: RouterDir,
    tmp_path: Path,
) -> None:
    registry = fresh_registry()
    gate = tmp_path / "gate"
    gate.mkdir()
    register_in(registry, BlockingModel(str(gate), p=0.3), alias="champion")
    register_in(registry, ConstantModel(p=0.9), alias="challenger")
    settings = router_dir.settings(
        registry,
        routing={"challenger_weight": 0.5, "salt": SALT},
        server={"predict_threads": 1, "champion_timeout_s": None, "batch_max_rows": 1},
    )
    body = split_body(registry.holdout[FEATURES].head(1))
    to_challenger = keys_for("challenger", 5, salt=SALT, weight=0.5)
    champion_key = keys_for("champion", 1, salt=SALT, weight=0.5)[0]
    with running_router(settings) as client:
        # The champion's only thread hangs on a live request: no idle thread for the covariate.
        held = threading.Thread(target=_post, args=(client, body, champion_key, "held"))
        held.start()
        wait_until(lambda: (gate / "started").exists(), "the champion to start predicting")
        for i, key in enumerate(to_challenger):
            answer = _post(client, body, key, f"ch-{i}")
            assert answer.status_code == 200 and answer.json()["arm"] == "challenger"
        wait_until(
            lambda: (
                router_dir.log_rows("SELECT count(*) FROM predictions WHERE arm = 'challenger'")[0][
                    0
                ]
                == 5
            ),
            "the challenger's rows, written without waiting for the champion",
        )
        skipped = scrape(client).total("router_covariate_scorings_total", result="skipped")
        (gate / "release").touch()
        held.join(timeout=60)
        wait_until(
            lambda: router_dir.log_rows("SELECT count(*) FROM predictions")[0][0] == 6,
            "the held request's row",
        )

    assert skipped == 5
    assert router_dir.log_rows(
        "SELECT arm, champion_score FROM predictions ORDER BY arm, request_id"
    ) == [("challenger", None)] * 5 + [("champion", pytest.approx(0.3))]
