"""End to end: a schema change runs a whole experiment (real registry, real uvicorn, real CLI).

Two experiments, each with its own champion and challenger trained here on a label the test
controls, so that the verdict is known in advance:

- the challenger ADDS a column (``NEW``, which decides the label): clients sending the union are
  answered by the model of their arm, each given its own columns; old clients assigned to the
  challenger are answered by the champion and logged in the challenger's arm (``fallback``,
  reason ``schema``); the challenger, better even under intent-to-treat, is promoted (exit 0);
- the challenger DROPS a column (``age``, which decides the label): every client sends the
  champion's columns (the union), a few new clients only the challenger's; the latter are 400s in
  the champion's arm (client errors, never judged); the challenger, worse, is rejected (exit 3).

Every served answer is compared with the pyfunc prediction of the version that served it on that
version's own columns, and the CLI's intent-to-treat counts with the log.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import mlflow.pyfunc
import numpy as np
import pandas as pd
import pytest
from sklearn.compose import ColumnTransformer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from demo.data import FEATURES, NUMERIC_FEATURES, make_churn_data
from demo.train import register_model, using_tracking_uri
from experiments.cli import evaluate_and_promote_main
from router import logschema
from tests.conftest import FreshRegistry, MlflowRegistry, RunningRouter
from tests.live_router import RouterDir, keys_for
from tests.synthlog import write_config

SALT = "schema-change"
NEW = "loyalty_score"
DROPPED = "age"
TRAIN_ROWS = 600
USERS_PER_ARM = 40  # routing keys: the units of analysis
ROWS_PER_REQUEST = 10  # one request per user
WINDOW_S = 3.0  # outcome window: feedback follows each answer at once
EXPERIMENT = {
    "outcome_window_s": WINDOW_S,
    "min_samples_per_arm": 20,
    "planned_samples": 200,
    # Latency on a machine shared with other tests is not what this test judges.
    "guardrails": {"max_latency_p95_increase": 1000.0},
}


pytestmark = pytest.mark.usefixtures("cli_workdir")  # tests/conftest.py


def _logistic(numeric: Sequence[str]) -> Pipeline:
    scaled = ColumnTransformer([("num", StandardScaler(), list(numeric))], remainder="drop")
    return Pipeline([("features", scaled), ("clf", LogisticRegression(random_state=0))])


def _customers(n: int, seed: int) -> pd.DataFrame:
    """Customers with ``NEW`` beside ``FEATURES`` (no label: each test makes its own)."""
    frame = make_churn_data(n, seed)[FEATURES]
    return frame.assign(**{NEW: np.random.default_rng(seed).normal(size=n)})


def _register(registry: MlflowRegistry, columns: list[str], data: pd.DataFrame, alias: str) -> str:
    numeric = [c for c in columns if c in NUMERIC_FEATURES or c == NEW]
    model = _logistic(numeric).fit(data[columns], data["label"])
    return register_model(
        registry.tracking_uri, registry.model_name, model, data[columns], alias=alias
    )


def _experiment(
    registry: MlflowRegistry,
    seed: int,
    signal: Callable[[pd.DataFrame], pd.Series],
    noise: float,
    challenger_columns: list[str],
) -> tuple[pd.DataFrame, str, str]:
    """``(traffic, champion, challenger)``: label = ``signal + noise > 0``; both models trained on
    ``TRAIN_ROWS`` customers, the champion on ``FEATURES``, the challenger on its own columns."""
    data = _customers(TRAIN_ROWS + 2 * USERS_PER_ARM * ROWS_PER_REQUEST, seed)
    jitter = np.random.default_rng(seed + 1).normal(scale=noise, size=len(data))
    data["label"] = (signal(data) + jitter > 0).astype(int)
    train, traffic = data.iloc[:TRAIN_ROWS], data.iloc[TRAIN_ROWS:].reset_index(drop=True)
    champion = _register(registry, FEATURES, train, "champion")
    challenger = _register(registry, challenger_columns, train, "challenger")
    return traffic, champion, challenger


def _predict(registry: MlflowRegistry, version: str, frame: pd.DataFrame) -> np.ndarray:
    with using_tracking_uri(registry.tracking_uri):
        model = mlflow.pyfunc.load_model(f"models:/{registry.model_name}/{version}")
    return np.asarray(model.predict(frame), dtype=np.float64)


@dataclass(frozen=True)
class Sent:
    request_id: str
    assigned: str  # the arm the key belongs to
    columns: list[str]  # what the client sent
    frame: pd.DataFrame  # the rows, all columns
    response: httpx.Response


def _send(
    client: httpx.Client, frame: pd.DataFrame, columns: list[str], key: str, rid: str, arm: str
) -> Sent:
    sent = frame[columns]
    body = {"dataframe_split": {"columns": columns, "data": sent.to_numpy().tolist()}}
    response = client.post(
        "/invocations", json=body, headers={"X-Routing-Key": key, "X-Request-Id": rid}
    )
    if response.status_code == 200:  # its true outcome, one per row, at once
        outcome = {"request_id": rid, "outcome": [int(v) for v in frame["label"]]}
        assert client.post("/feedback", json=outcome).status_code == 200
    return Sent(rid, arm, columns, frame, response)


def _run_traffic(
    registry: MlflowRegistry,
    running_router: RunningRouter,
    router_dir: RouterDir,
    traffic: pd.DataFrame,
    columns_for: Callable[[str, int], list[str]],
) -> list[Sent]:
    """One request of ``ROWS_PER_REQUEST`` rows per user; ``columns_for(arm, i)`` what user i of
    that arm sends. Returns once every prediction's outcome window has closed."""
    settings = router_dir.settings(registry, routing={"challenger_weight": 0.5, "salt": SALT})
    keys = {
        arm: keys_for(arm, USERS_PER_ARM, salt=SALT, weight=0.5)
        for arm in ("champion", "challenger")
    }
    sent: list[Sent] = []
    with running_router(settings) as client:
        for i in range(USERS_PER_ARM):
            for j, arm in enumerate(("champion", "challenger")):
                start = (2 * i + j) * ROWS_PER_REQUEST
                rows = traffic.iloc[start : start + ROWS_PER_REQUEST]
                rid = f"{arm[:5]}-{i}"
                sent.append(_send(client, rows, columns_for(arm, i), keys[arm][i], rid, arm))
    time.sleep(WINDOW_S + 0.5)  # the last predictions mature: the evaluator judges them all
    return sent


def _evaluate(registry: MlflowRegistry, log_url: str, tmp_path: Path) -> tuple[int, Any]:
    config = write_config(
        tmp_path / "config.yaml",
        {
            "model": {"name": registry.model_name, "tracking_uri": registry.tracking_uri},
            "prediction_log": {"url": log_url},
            "routing": {"challenger_weight": 0.5, "salt": SALT},
            "experiment": EXPERIMENT,
        },
    )
    out = tmp_path / "evaluation.json"
    code = evaluate_and_promote_main(["--config", str(config), "--json", str(out)])
    return code, json.loads(out.read_text(encoding="utf-8"))


def _assert_served_by_own_columns(
    registry: MlflowRegistry, sent: list[Sent], columns: dict[str, list[str]]
) -> None:
    """Each 200 answer equals the pyfunc prediction of the version that served it, given that
    version's own columns (whatever else the client sent)."""
    for s in sent:
        if s.response.status_code != 200:
            continue
        version = s.response.json()["model_version"]
        expected = _predict(registry, version, s.frame[columns[version]])
        served = np.asarray(s.response.json()["predictions"], dtype=np.float64)
        np.testing.assert_allclose(served, expected, rtol=1e-9, err_msg=s.request_id)


def _aliases(registry: MlflowRegistry) -> dict[str, str]:
    model = registry.client().get_registered_model(registry.model_name)
    return {alias: str(version) for alias, version in model.aliases.items()}


def _log_counts(router_dir: RouterDir) -> list[tuple[Any, ...]]:
    return router_dir.log_rows(
        "SELECT substr(request_id, 1, 5), arm, model_version, status, reason, "
        "count(DISTINCT request_id), count(*) FROM predictions GROUP BY 1, 2, 3, 4, 5 "
        "ORDER BY 1, 4",
    )


def test_a_challenger_that_adds_a_column_is_promoted_with_old_clients_in_its_arm(
    fresh_registry: FreshRegistry,
    running_router: RunningRouter,
    router_dir: RouterDir,
    tmp_path: Path,
) -> None:
    registry = fresh_registry()
    union = [*FEATURES, NEW]
    # The new column decides the outcome.
    traffic, champion, challenger = _experiment(registry, 7, lambda d: d[NEW], 0.1, union)

    # Every fourth user of each arm is an old client (FEATURES only), the others new (the union).
    sent = _run_traffic(
        registry,
        running_router,
        router_dir,
        traffic,
        lambda _arm, i: FEATURES if i % 4 == 0 else union,
    )

    assert [s.request_id for s in sent if s.response.status_code != 200] == []
    served = {(s.assigned, s.columns == union, s.response.json()["arm"]) for s in sent}
    assert served == {
        ("champion", False, "champion"),
        ("champion", True, "champion"),
        ("challenger", False, "champion"),  # old clients: the champion answers for the challenger
        ("challenger", True, "challenger"),
    }
    _assert_served_by_own_columns(registry, sent, {champion: FEATURES, challenger: union})
    old = USERS_PER_ARM // 4
    new = USERS_PER_ARM - old
    rows = ROWS_PER_REQUEST
    assert _log_counts(router_dir) == [
        ("chall", "challenger", champion, "fallback", "schema", old, old * rows),
        ("chall", "challenger", challenger, "ok", None, new, new * rows),
        ("champ", "champion", champion, "ok", None, USERS_PER_ARM, USERS_PER_ARM * rows),
    ]

    code, evaluation = _evaluate(registry, router_dir.log_url, tmp_path)

    assert (code, evaluation["decision"]) == (0, "promote"), evaluation["reason"]
    assert evaluation["experiment_id"] == logschema.experiment_id(
        registry.model_name, champion, challenger
    )
    arms = evaluation["champion"], evaluation["challenger"]
    # Intent-to-treat: the schema fallbacks stay in the challenger's arm, judged on the answer
    # the champion served.
    assert [(a["requests"], a["fallbacks"], a["client_errors"]) for a in arms] == [
        (USERS_PER_ARM, 0, 0),
        (USERS_PER_ARM, old, 0),
    ]
    assert [a["units"] for a in arms] == [USERS_PER_ARM, USERS_PER_ARM]
    aliases = _aliases(registry)
    assert (aliases.get("champion"), aliases.get("challenger")) == (challenger, None)


def test_a_challenger_that_drops_a_column_is_rejected_and_never_sees_it(
    fresh_registry: FreshRegistry,
    running_router: RunningRouter,
    router_dir: RouterDir,
    tmp_path: Path,
) -> None:
    registry = fresh_registry()
    kept = [c for c in FEATURES if c != DROPPED]
    # The dropped column decides the outcome.
    traffic, champion, challenger = _experiment(
        registry, 11, lambda d: (d[DROPPED] - d[DROPPED].mean()) / d[DROPPED].std(), 0.3, kept
    )

    # Everyone sends the union (the champion's columns) but every tenth user, a new client
    # sending only the challenger's.
    sent = _run_traffic(
        registry,
        running_router,
        router_dir,
        traffic,
        lambda _arm, i: kept if i % 10 == 9 else FEATURES,
    )

    narrow_to_champion = [s for s in sent if s.columns == kept and s.assigned == "champion"]
    refused = [s for s in sent if s.response.status_code != 200]
    assert refused == narrow_to_champion
    for s in refused:  # the champion needs the column: a 400 naming it
        assert s.response.status_code == 400, s.response.text
        assert DROPPED in s.response.json()["message"]
    assert {s.response.json()["arm"] for s in sent if s.assigned == "challenger"} == {"challenger"}
    _assert_served_by_own_columns(registry, sent, {champion: FEATURES, challenger: kept})
    narrow = USERS_PER_ARM // 10
    rows = ROWS_PER_REQUEST
    assert _log_counts(router_dir) == [
        ("chall", "challenger", challenger, "ok", None, USERS_PER_ARM, USERS_PER_ARM * rows),
        ("champ", "champion", champion, "client_error", "bad_input", narrow, narrow * rows),
        (
            "champ",
            "champion",
            champion,
            "ok",
            None,
            USERS_PER_ARM - narrow,
            (USERS_PER_ARM - narrow) * rows,
        ),
    ]

    code, evaluation = _evaluate(registry, router_dir.log_url, tmp_path)

    assert (code, evaluation["decision"]) == (3, "reject"), evaluation["reason"]
    arms = evaluation["champion"], evaluation["challenger"]
    # Client errors are not judged and never count against the champion.
    assert [(a["requests"], a["fallbacks"], a["client_errors"]) for a in arms] == [
        (USERS_PER_ARM - narrow, 0, narrow),
        (USERS_PER_ARM, 0, 0),
    ]
    aliases = _aliases(registry)  # the experiment ended: the champion serves all traffic
    assert (aliases.get("champion"), aliases.get("challenger")) == (champion, None)
