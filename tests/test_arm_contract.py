"""End to end: each arm takes the input against its own signature (real registry, real uvicorn).

A challenger that adds a column and one that drops a column run traffic from old clients (the
champion's columns) and new ones (the union); every row lands in its assigned arm, with the
answer served (intent-to-treat), and ``/experiment`` says how the signatures differ.
"""

from __future__ import annotations

from typing import Any

import httpx
import numpy as np
import pandas as pd

from demo.data import FEATURES
from tests.conftest import FreshRegistry, MlflowRegistry, RunningRouter
from tests.live_router import (
    RouterDir,
    keys_for,
    wait_until,
)
from tests.metrics_text import scrape
from tests.pyfunc_models import ColumnsModel, register_pyfunc

SALT = "contract-tests"
NEW = "loyalty_score"
DROPPED = "age"


def _body(frame: pd.DataFrame) -> dict[str, Any]:
    return {"dataframe_split": {"columns": list(frame.columns), "data": frame.to_numpy().tolist()}}


def _post(client: httpx.Client, frame: pd.DataFrame, key: str, request_id: str) -> httpx.Response:
    return client.post(
        "/invocations",
        json=_body(frame),
        headers={"X-Routing-Key": key, "X-Request-Id": request_id},
    )


def _with_new_column(registry: MlflowRegistry) -> pd.DataFrame:
    frame = registry.holdout[FEATURES].head(8).reset_index(drop=True)
    return frame.assign(**{NEW: np.linspace(0.0, 1.0, len(frame))})


def _challenger_with_new_column(registry: MlflowRegistry) -> tuple[pd.DataFrame, str, str]:
    """Rows with the new column, the @challenger version that takes it, the champion version."""
    union = _with_new_column(registry)
    challenger = register_pyfunc(
        registry.tracking_uri,
        registry.model_name,
        ColumnsModel([*FEATURES, NEW], p=0.9),
        union,
        alias="challenger",
    )
    return union, challenger, registry.versions["champion"]


def test_a_challenger_that_adds_a_column_gets_it_and_old_clients_fall_back_on_schema(
    fresh_registry: FreshRegistry, running_router: RunningRouter, router_dir: RouterDir
) -> None:
    registry = fresh_registry()
    union, challenger, champion = _challenger_with_new_column(registry)
    settings = router_dir.settings(
        registry,
        routing={"challenger_weight": 0.5, "salt": SALT},
    )
    to_challenger = keys_for("challenger", 4, salt=SALT, weight=0.5)
    to_champion = keys_for("champion", 4, salt=SALT, weight=0.5)
    old = union[FEATURES]
    with running_router(settings) as client:
        experiment = client.get("/experiment").json()
        answers: dict[str, httpx.Response] = {}
        for i, key in enumerate(to_challenger):
            answers[f"new-ch-{i}"] = _post(client, union.iloc[[i]], key, f"new-ch-{i}")
            answers[f"old-ch-{i}"] = _post(client, old.iloc[[i]], key, f"old-ch-{i}")
        for i, key in enumerate(to_champion):
            answers[f"new-cp-{i}"] = _post(client, union.iloc[[i]], key, f"new-cp-{i}")
            answers[f"old-cp-{i}"] = _post(client, old.iloc[[i]], key, f"old-cp-{i}")
        metrics = scrape(client)
        after = client.get("/experiment").json()

    assert {rid: r.status_code for rid, r in answers.items()} == dict.fromkeys(answers, 200)
    served = {rid: (r.json()["arm"], r.json()["model_version"]) for rid, r in answers.items()}
    for rid, answer in served.items():
        # Only new clients reach the challenger; everything else is the champion's answer.
        wanted = ("challenger", challenger) if rid.startswith("new-ch") else ("champion", champion)
        assert answer == wanted, rid
    for i in range(4):
        np.testing.assert_allclose(answers[f"new-ch-{i}"].json()["predictions"], [[0.1, 0.9]])

    rows = router_dir.log_rows(
        "SELECT substr(request_id, 1, 6), arm, model_version, status, reason, count(*) "
        "FROM predictions GROUP BY 1, 2, 3, 4, 5 ORDER BY 1",
    )
    assert rows == [
        ("new-ch", "challenger", challenger, "ok", None, 4),
        ("new-cp", "champion", champion, "ok", None, 4),
        ("old-ch", "challenger", champion, "fallback", "schema", 4),  # intent-to-treat
        ("old-cp", "champion", champion, "ok", None, 4),
    ]
    assert metrics.total("router_fallback_total", reason="schema") == 4
    assert metrics.total("router_fallback_total") == 4
    assert metrics.total("router_requests_total", arm="challenger", status="fallback") == 4
    assert metrics.total("router_challenger_circuit_open") == 0  # not the challenger's fault
    assert after["challenger_circuit"]["state"] == "closed"
    assert after["challenger_fallbacks"] == {"schema": 4}
    signatures = experiment["signatures"]
    assert (signatures["added"], signatures["dropped"], signatures["retyped"]) == ([NEW], [], [])
    assert NEW in signatures["summary"]


def test_a_challenger_that_drops_a_column_never_sees_it_and_takes_requests_without_it(
    fresh_registry: FreshRegistry, running_router: RunningRouter, router_dir: RouterDir
) -> None:
    registry = fresh_registry()
    full = registry.holdout[FEATURES].head(8).reset_index(drop=True)
    narrow = full.drop(columns=[DROPPED])
    kept = [c for c in FEATURES if c != DROPPED]
    challenger = register_pyfunc(
        registry.tracking_uri,
        registry.model_name,
        ColumnsModel(kept, p=0.2),
        narrow,
        alias="challenger",
    )
    champion = registry.versions["champion"]
    settings = router_dir.settings(
        registry,
        routing={"challenger_weight": 0.5, "salt": SALT},
    )
    to_challenger = keys_for("challenger", 3, salt=SALT, weight=0.5)
    to_champion = keys_for("champion", 3, salt=SALT, weight=0.5)
    with running_router(settings) as client:
        experiment = client.get("/experiment").json()
        answers: dict[str, httpx.Response] = {}
        for i in range(3):
            answers[f"full-ch-{i}"] = _post(
                client, full.iloc[[i]], to_challenger[i], f"full-ch-{i}"
            )
            answers[f"nrrw-ch-{i}"] = _post(
                client, narrow.iloc[[i]], to_challenger[i], f"nrrw-ch-{i}"
            )
            answers[f"full-cp-{i}"] = _post(client, full.iloc[[i]], to_champion[i], f"full-cp-{i}")
            answers[f"nrrw-cp-{i}"] = _post(
                client, narrow.iloc[[i]], to_champion[i], f"nrrw-cp-{i}"
            )
        metrics = scrape(client)

    for rid, response in answers.items():
        if rid.startswith("nrrw-cp"):
            # The champion needs the column: the client's fault, named, never a model error.
            assert response.status_code == 400, response.text
            assert DROPPED in response.json()["error"]["message"]
            continue
        assert response.status_code == 200, (rid, response.text)
        arm = "challenger" if "-ch-" in rid else "champion"
        version = challenger if arm == "challenger" else champion
        assert (response.json()["arm"], response.json()["model_version"]) == (arm, version)

    rows = router_dir.log_rows(
        "SELECT substr(request_id, 1, 7), arm, model_version, status, reason, "
        "count(*), min(row_index) FROM predictions GROUP BY 1, 2, 3, 4, 5 ORDER BY 1",
    )
    assert rows == [
        ("full-ch", "challenger", challenger, "ok", None, 3, 0),
        ("full-cp", "champion", champion, "ok", None, 3, 0),
        ("nrrw-ch", "challenger", challenger, "ok", None, 3, 0),
        ("nrrw-cp", "champion", champion, "client_error", "bad_input", 3, 0),
    ]
    assert metrics.total("router_requests_total", arm="champion", status="client_error") == 3
    assert metrics.total("router_requests_total", status="error") == 0
    assert metrics.total("router_fallback_total") == 0
    signatures = experiment["signatures"]
    assert (signatures["added"], signatures["dropped"]) == ([], [DROPPED])


def test_in_shadow_mode_each_model_gets_its_own_view_of_the_same_input(
    fresh_registry: FreshRegistry, running_router: RunningRouter, router_dir: RouterDir
) -> None:
    registry = fresh_registry()
    union, challenger, champion = _challenger_with_new_column(registry)
    settings = router_dir.settings(registry, routing={"mode": "shadow"})
    with running_router(settings) as client:
        for i in range(3):
            new = _post(client, union.iloc[[i]], f"k{i}", f"new-{i}")
            old = _post(client, union[FEATURES].iloc[[i]], f"k{i}", f"old-{i}")
            for response in (new, old):
                assert response.status_code == 200, response.text
                assert response.json()["model_version"] == champion
        wait_until(
            lambda: len(router_dir.log_rows("SELECT 1 FROM predictions WHERE arm = 'shadow'")) == 6,
            "every shadow row logged",
        )

    rows = router_dir.log_rows(
        "SELECT substr(request_id, 1, 3), arm, model_version, status, reason, count(*) "
        "FROM predictions GROUP BY 1, 2, 3, 4, 5 ORDER BY 1, 2",
    )
    assert rows == [
        ("new", "champion", champion, "ok", None, 3),
        ("new", "shadow", challenger, "ok", None, 3),
        ("old", "champion", champion, "ok", None, 3),
        ("old", "shadow", challenger, "error", "schema", 3),  # not a fault of the challenger
    ]
