"""Feedback integrity (issue 20, item 8): one outcome counts once; a 409 discloses nothing stored.

Before: one ``X-Request-Id`` reused by requests assigned to different arms left rows in both arms,
and one outcome counted in both arms' metrics and in the evaluator; a 409 quoted the outcome
another client had stored (``already has outcome 1``). Now the log keeps one assigned arm per
(request_id, row_index) (``logschema.ONE_ASSIGNED_ARM``: the later request is served, not logged,
counted as a duplicate), a log whose rows predate that index has such ids refused at feedback, and
the 409 names only the request and row.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from demo.data import FEATURES
from router.errors import Conflict
from router.log.feedback import FeedbackItem
from router.log.predlog import PredictionLog
from router.logschema import ONE_ASSIGNED_ARM, Arm, metadata
from tests.conftest import MlflowRegistry, RunningRouter
from tests.live_router import RouterDir, keys_for, split_body
from tests.metrics_text import scrape
from tests.pg import isolated_schema_url
from tests.test_predlog import rec

SALT = "integrity"


def test_a_request_id_reused_in_the_other_arm_counts_its_outcome_once(
    fresh_registry: Callable[[], MlflowRegistry],
    router_dir: RouterDir,
    running_router: RunningRouter,
) -> None:
    registry = fresh_registry()
    settings = router_dir.settings(registry, routing={"challenger_weight": 0.5, "salt": SALT})
    (champion_key,) = keys_for("champion", 1, salt=SALT, weight=0.5)
    (challenger_key,) = keys_for("challenger", 1, salt=SALT, weight=0.5)
    body = split_body(registry.holdout.head(1))
    with running_router(settings) as client:
        for key, arm in ((champion_key, "champion"), (challenger_key, "challenger")):
            answer = client.post(
                "/invocations",
                json=body,
                headers={"X-Routing-Key": key, "X-Request-Id": "reused-id"},
            )
            assert answer.status_code == 200, answer.text
            assert answer.json()["arm"] == arm  # both served, each by its arm
        fed = client.post("/feedback", json={"request_id": "reused-id", "outcome": 1})
        assert fed.status_code == 200, fed.text
        assert fed.json()["accepted"] == [{"request_id": "reused-id", "rows": 1, "created": 1}]
        metrics = scrape(client)
    assert metrics.total("router_feedback_total") == 1  # before: 1 in each arm
    assert metrics.total("router_feedback_total", arm="champion") == 1
    # The first request's row alone; the outcome joins it alone, as the evaluator reads it.
    assert router_dir.log_rows(
        "SELECT p.arm, o.outcome FROM predictions p JOIN outcomes o USING (request_id, row_index)"
    ) == [("champion", "1")]


def test_a_conflict_does_not_tell_the_stored_outcome(
    fresh_registry: Callable[[], MlflowRegistry],
    router_dir: RouterDir,
    running_router: RunningRouter,
) -> None:
    registry = fresh_registry()
    settings = router_dir.settings(registry, routing={"challenger_weight": 0.0})
    with running_router(settings) as client:
        served = client.post("/invocations", json=split_body(registry.holdout[FEATURES].head(1)))
        request_id = served.json()["request_id"]
        stored = client.post(
            "/feedback", json={"request_id": request_id, "outcome": "label-only-its-sender-knows"}
        )
        assert stored.status_code == 200, stored.text
        other = client.post("/feedback", json={"request_id": request_id, "outcome": "guess"})
    assert other.status_code == 409, other.text
    message = other.json()["message"]
    assert message == (
        f"request_id {request_id!r} already has a different outcome for row 0; "
        "an outcome is stored once and never changed"
    )
    assert "label-only-its-sender-knows" not in other.text


def _record(request_id: str, arm: Arm) -> dict[str, Any]:
    return dataclasses.asdict(rec(request_id, arm=arm.value))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def log_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'predictions.db'}"
    else:
        with isolated_schema_url() as url:
            yield url


def test_a_log_from_before_the_index_refuses_feedback_for_an_id_in_both_arms(
    log_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Rows an older router logged in both arms: the index cannot be created (said once), the
    log keeps working, and an outcome for such an id is a 409 rather than counted twice."""
    url = log_url
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        metadata.create_all(conn)
        ONE_ASSIGNED_ARM.drop(conn)  # the tables as an older router created them
        conn.execute(
            metadata.tables["predictions"].insert(),
            [_record("old-reuse", Arm.CHAMPION), _record("old-reuse", Arm.CHALLENGER)],
        )
    engine.dispose()
    plog = PredictionLog(url)
    with caplog.at_level(logging.WARNING, logger="router.log.database"):
        plog.start()
        assert plog.wait_prepared(30.0)
    try:
        assert "predictions_one_assigned_arm" in caplog.text, caplog.text
        plog.enqueue([rec("new")])
        (result,) = plog.record_feedback([FeedbackItem("new", 1)])
        assert result.created == 1
        with pytest.raises(Conflict, match="logged in both arms"):
            plog.record_feedback([FeedbackItem("old-reuse", 1)])
    finally:
        plog.close()
