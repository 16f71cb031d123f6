"""Helpers for tests that drive a live router: settings, request bodies, a client, polling, the log.

Used by the end-to-end tests of arms, hot reload and shutdown (``tests/test_router_*.py``), and by
the live Prometheus and status-page tests for their traffic.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import httpx
import pandas as pd
import sqlalchemy as sa

from demo.data import FEATURES, LABEL
from router.assignment import bucket_of, threshold_of
from router.config import Settings, settings_from_mapping

if TYPE_CHECKING:  # conftest is pytest's to import; a second import would run it twice
    from tests.conftest import MlflowRegistry

T = TypeVar("T")

DEADLINE_S = 60.0  # generous: polls end as soon as the state is reached


def router_settings(
    registry: MlflowRegistry,
    log_path: Path,
    *,
    env: Mapping[str, str] | None = None,
    model: Mapping[str, Any] | None = None,
    **sections: Mapping[str, Any],
) -> Settings:
    """Settings for ``registry``'s model with a SQLite prediction log at ``log_path``.

    ``model`` and every other section (``routing={...}``, ...) are merged over the defaults used
    here; ``env`` is the whole environment the settings see (nothing leaks from the test's own).
    """
    raw: dict[str, Any] = {
        "model": {
            "name": registry.model_name,
            "tracking_uri": registry.tracking_uri,
            "poll_interval_s": 3600,  # no hot reload unless a test asks for it
            **(model or {}),
        },
        "prediction_log": {"url": f"sqlite:///{log_path}"},
    }
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return settings_from_mapping(raw, env=dict(env or {}))


@dataclass(frozen=True)
class RouterDir:
    """A router's files in one test directory: its SQLite prediction log, ``predictions.db``.

    ``settings`` are :func:`router_settings` with that log; ``log_rows`` queries it.
    """

    root: Path

    @property
    def log_path(self) -> Path:
        return self.root / "predictions.db"

    @property
    def log_url(self) -> str:
        return f"sqlite:///{self.log_path}"

    def settings(
        self,
        registry: MlflowRegistry,
        *,
        env: Mapping[str, str] | None = None,
        model: Mapping[str, Any] | None = None,
        **sections: Mapping[str, Any],
    ) -> Settings:
        """:func:`router_settings` for ``registry`` logging to :attr:`log_path`."""
        return router_settings(registry, self.log_path, env=env, model=model, **sections)

    def log_rows(self, sql: str, **params: Any) -> list[tuple[Any, ...]]:
        """Rows of ``sql`` against this directory's prediction log (see :func:`query_log`)."""
        return query_log(self.log_url, sql, **params)


def split_body(frame: pd.DataFrame) -> dict[str, Any]:
    """An MLflow ``dataframe_split`` body for the feature columns of ``frame``."""
    return {"dataframe_split": json.loads(frame[FEATURES].to_json(orient="split", index=False))}


def http_client(base_url: str, *, keep_alive: bool = True, timeout_s: float = 60.0) -> httpx.Client:
    """A client for a live router; ``keep_alive=False`` opens one connection per request (so that
    with ``--workers N`` successive requests may land on different workers)."""
    return httpx.Client(
        base_url=base_url,
        timeout=timeout_s,
        limits=httpx.Limits(max_keepalive_connections=None if keep_alive else 0),
    )


def keys_for(arm: str, n: int, *, salt: str, weight: float, start: int = 0) -> list[str]:
    """The first ``n`` routing keys from ``user-{start}`` on that the sticky hash sends to ``arm``.

    Deterministic, so that a test sends traffic to both arms without depending on chance.
    """
    threshold = threshold_of(weight)
    keys = (f"user-{i}" for i in range(start, start + 100_000))
    wanted = (k for k in keys if (bucket_of(salt, k) < threshold) == (arm == "challenger"))
    return [next(wanted) for _ in range(n)]


def send_with_feedback(
    client: httpx.Client, rows: pd.DataFrame, keys: Sequence[str]
) -> list[dict[str, Any]]:
    """Score row ``i`` of ``rows`` alone with routing key ``keys[i]``, then send its true outcome.

    ``rows`` holds the features and ``LABEL``; every request and every feedback must answer 200.
    Returns the ``/invocations`` bodies, in order.
    """
    features = rows.drop(columns=[LABEL])
    answers: list[dict[str, Any]] = []
    for i, key in enumerate(keys):
        body = {
            "dataframe_split": {
                "columns": list(features.columns),
                "data": features.iloc[[i]].to_numpy().tolist(),
            }
        }
        response = client.post("/invocations", json=body, headers={"X-Routing-Key": key})
        assert response.status_code == 200, response.text
        answer: dict[str, Any] = response.json()
        outcome = {"request_id": answer["request_id"], "outcome": int(rows[LABEL].iloc[i])}
        assert client.post("/feedback", json=outcome).status_code == 200
        answers.append(answer)
    return answers


def wait_until(
    probe: Callable[[], T | None],
    what: str,
    *,
    timeout_s: float = DEADLINE_S,
    interval_s: float = 0.05,
) -> T:
    """Call ``probe`` until it returns something truthy and return it; fail after ``timeout_s``.

    The deadline only bounds the loop: the assertion is on the state reached, never on the time.
    """
    deadline = time.monotonic() + timeout_s
    last: T | None = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what} (last: {last!r})")


def wait_ready(client: httpx.Client) -> dict[str, Any]:
    """Poll ``/readyz`` until 200; return its body."""
    response = wait_until(
        lambda: (r := client.get("/readyz")).status_code == 200 and r, "/readyz to answer 200"
    )
    body: dict[str, Any] = response.json()
    return body


def wait_key_secret(client: httpx.Client) -> None:
    """Poll ``/readyz`` until the routing-key secret is read (rows logged before carry no hash)."""

    def loaded() -> bool:
        state = client.get("/readyz").json()["prediction_log"]["routing_key_secret"]
        return bool(state["loaded"])

    wait_until(loaded, "the routing-key secret to be read")


def arm_of(experiment: Mapping[str, Any], arm: str) -> dict[str, Any] | None:
    """The entry for ``arm`` in a ``/experiment`` body, or None."""
    for entry in experiment["arms"]:
        if entry["arm"] == arm:
            found: dict[str, Any] = entry
            return found
    return None


def query_log(url: str, sql: str, **params: Any) -> list[tuple[Any, ...]]:
    """Rows of ``sql`` against the prediction log at ``url`` (a fresh engine each call)."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return [tuple(row) for row in conn.execute(sa.text(sql), params)]
    finally:
        engine.dispose()


def transition_to_production(registry: MlflowRegistry, version: str) -> None:
    """Put ``version`` in the legacy Production stage (the champion's fallback without an alias)."""
    with warnings.catch_warnings():
        # Stages are deprecated in favour of aliases; the fallback exists for registries that
        # still use them, so the test has to put a version there the old way.
        warnings.filterwarnings(
            "ignore",
            message=r".*transition_model_version_stage.* is deprecated",
            category=FutureWarning,
        )
        registry.client().transition_model_version_stage(registry.model_name, version, "Production")
