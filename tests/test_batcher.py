"""The micro-batcher: unit tests with a fake predict, then end to end under real uvicorn.

Unit tests run the batcher on an event loop with an inline runner (no threads), so what they
assert is the structure of the model calls (how many, with how many rows), never a duration.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, TypeVar

import httpx
import mlflow
import numpy as np
import pandas as pd
import pytest

from experiments.demo_data import FEATURES
from experiments.train import using_tracking_uri
from router.app import create_app
from router.batcher import BatchScore, MicroBatcher, split_output
from tests.conftest import MlflowRegistry
from tests.live_router import http_client, query_log, router_settings, wait_ready, wait_until
from tests.metrics_text import scrape
from tests.pyfunc_models import FailingModel, register_pyfunc

T = TypeVar("T")
RunningServer = Callable[..., AbstractContextManager[str]]
FreshRegistry = Callable[[], MlflowRegistry]
NEVER_S = 3600.0  # a wait no test could sit through: reaching the assertion means no wait


class FakeModel:
    """Counts calls and their row counts; scores ``x * 10``; refuses negative ``x``."""

    def __init__(self, shape: str = "array") -> None:
        self.calls: list[int] = []
        self.shape = shape

    def __call__(self, frame: pd.DataFrame) -> Any:
        self.calls.append(len(frame))
        if (frame["x"] < 0).any():
            raise ValueError("negative x")
        values = frame["x"].to_numpy() * 10.0
        if self.shape == "series":
            return pd.Series(values, name="y")
        if self.shape == "frame":
            return pd.DataFrame({"y": values, "z": -values})
        if self.shape == "list":
            return values.tolist()
        if self.shape == "proba":
            return np.column_stack([1 - values / 100, values / 100])
        return values


async def _inline(fn: Callable[[], Any]) -> Any:
    return fn()


def _frame(*xs: float) -> pd.DataFrame:
    return pd.DataFrame({"x": np.array(xs, dtype=np.float64)})


def _batcher(model: Callable[[pd.DataFrame], Any], **kw: Any) -> MicroBatcher:
    options: dict[str, Any] = {"max_rows": 32, "wait_s": NEVER_S, "run": _inline}
    options.update(kw)
    return MicroBatcher(model, **options)


def _run(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    return asyncio.run(main())


async def _spin(n: int = 5) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def _as_list(prediction: Any) -> Any:
    if isinstance(prediction, pd.DataFrame):
        return prediction.to_dict(orient="records")
    if isinstance(prediction, pd.Series | np.ndarray):
        return prediction.tolist()
    return prediction


@pytest.mark.parametrize("shape", ["array", "proba", "series", "frame", "list"])
def test_concurrent_requests_share_one_call_and_get_their_own_rows(shape: str) -> None:
    model = FakeModel(shape)
    frames = [_frame(1.0), _frame(2.0, 3.0), _frame(4.0)]

    async def main() -> list[BatchScore]:
        batcher = _batcher(model)
        return list(await asyncio.gather(*(batcher.submit(f) for f in frames)))

    scores = _run(main)
    assert model.calls == [4]
    for frame, score in zip(frames, scores, strict=True):
        assert _as_list(score.prediction) == _as_list(FakeModel(shape)(frame))
        assert score.batch_rows == 4


def test_a_lone_request_is_scored_at_once_even_with_a_long_wait() -> None:
    model = FakeModel()

    async def main() -> BatchScore:
        batcher = _batcher(model)
        task = asyncio.ensure_future(batcher.submit(_frame(5.0)))
        await _spin()
        assert model.calls == [1]  # called within a few loop turns: nothing was waited for
        return await task

    assert _run(main).prediction.tolist() == [50.0]


def test_a_batch_waits_for_announced_requests_and_not_after_they_withdraw() -> None:
    model = FakeModel()

    async def main() -> None:
        batcher = _batcher(model)
        batcher.expect()
        batcher.expect()
        first = asyncio.ensure_future(batcher.submit(_frame(1.0)))
        await _spin()
        assert model.calls == []  # two requests are still being parsed
        second = asyncio.ensure_future(batcher.submit(_frame(2.0), expected=True))
        await _spin()
        assert model.calls == []  # one is still announced
        batcher.withdraw()  # ...and turned out not to come
        await _spin()
        assert model.calls == [2]
        assert (await first).prediction.tolist() == [10.0]
        assert (await second).prediction.tolist() == [20.0]
        assert batcher.idle

    _run(main)


def test_a_full_batch_does_not_wait_and_max_rows_bounds_each_call() -> None:
    model = FakeModel()
    observed: list[int] = []

    async def main() -> None:
        batcher = _batcher(model, max_rows=2, on_batch=observed.append)
        for _ in range(10):
            batcher.expect()  # many more announced: only full batches may go without waiting
        tasks = [
            asyncio.ensure_future(batcher.submit(_frame(float(i)), expected=True)) for i in range(5)
        ]
        await _spin()
        assert model.calls == [2, 2]  # the fifth waits for company
        for _ in range(5):
            batcher.withdraw()
        results = await asyncio.gather(*tasks)
        assert [r.prediction.tolist() for r in results] == [[float(i * 10)] for i in range(5)]

    _run(main)
    assert model.calls == [2, 2, 1]
    assert observed == [2, 2, 1]


def test_a_failing_row_fails_only_its_own_request() -> None:
    model = FakeModel()

    async def main() -> list[Any]:
        batcher = _batcher(model)
        frames = [_frame(1.0), _frame(-1.0), _frame(2.0, 3.0)]
        return list(
            await asyncio.gather(*(batcher.submit(f) for f in frames), return_exceptions=True)
        )

    good, bad, also_good = _run(main)
    assert model.calls == [4, 1, 1, 2]  # the batch, then each request alone
    assert isinstance(bad, ValueError)
    assert good.prediction.tolist() == [10.0]
    assert also_good.prediction.tolist() == [20.0, 30.0]


def test_an_output_not_one_per_row_falls_back_to_one_call_per_request() -> None:
    calls: list[int] = []

    def total(frame: pd.DataFrame) -> np.ndarray:
        calls.append(len(frame))
        return np.array([frame["x"].sum()])  # one value per call, whatever the rows

    async def main() -> tuple[list[BatchScore], bool]:
        batcher = _batcher(total)
        scores = await asyncio.gather(batcher.submit(_frame(1.0, 2.0)), batcher.submit(_frame(5)))
        return list(scores), batcher.batchable

    scores, batchable = _run(main)
    assert calls == [3, 2, 1]
    assert [s.prediction.tolist() for s in scores] == [[3.0], [5.0]]
    assert not batchable  # the service scores this model alone from now on


def test_frames_of_different_dtypes_are_not_concatenated() -> None:
    model = FakeModel()
    as_int = pd.DataFrame({"x": np.array([7], dtype=np.int64)})

    async def main() -> list[BatchScore]:
        batcher = _batcher(model)
        submits = [batcher.submit(_frame(1.0)), batcher.submit(as_int), batcher.submit(_frame(2))]
        return list(await asyncio.gather(*submits))

    scores = _run(main)
    assert model.calls == [2, 1]
    assert [s.prediction.tolist() for s in scores] == [[10.0], [70], [20.0]]


def test_a_request_that_went_away_is_not_scored() -> None:
    model = FakeModel()

    async def main() -> None:
        batcher = _batcher(model)
        batcher.expect()
        gone = asyncio.ensure_future(batcher.submit(_frame(1.0)))
        kept = asyncio.ensure_future(batcher.submit(_frame(2.0)))
        await _spin()
        gone.cancel()
        batcher.withdraw()
        assert (await kept).prediction.tolist() == [20.0]

    _run(main)
    assert model.calls == [1]


def test_split_output_refuses_what_is_not_one_row_per_input_row() -> None:
    assert split_output(np.float64(1.0), [1]) is None
    assert split_output({"a": [1, 2]}, [1, 1]) is None
    assert split_output([1, 2, 3], [1, 1]) is None
    pieces = split_output(pd.Series([1, 2, 3], index=[7, 8, 9]), [2, 1])
    assert pieces is not None
    assert [p.tolist() for p in pieces] == [[1, 2], [3]]


# --- end to end ------------------------------------------------------------------------------


def _row_body(frame: pd.DataFrame, i: int) -> dict[str, Any]:
    row = frame.iloc[[i]]
    return {"dataframe_split": {"columns": list(row.columns), "data": row.to_numpy().tolist()}}


async def _fire(base_url: str, bodies: list[dict[str, Any]]) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(bodies))
    async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits) as client:
        return list(
            await asyncio.gather(
                *(
                    client.post(
                        "/invocations",
                        json=body,
                        headers={"X-Routing-Key": f"user-{i}", "X-Request-Id": f"b-{i:03d}"},
                    )
                    for i, body in enumerate(bodies)
                )
            )
        )


def test_concurrent_single_row_requests_are_batched_and_each_gets_its_own_answer(
    fresh_registry: FreshRegistry, running_server: RunningServer, tmp_path: Path
) -> None:
    registry = fresh_registry()
    # A long wait makes batches certain (the batch leaves once no announced request is parsing).
    settings = router_settings(
        registry,
        tmp_path / "predictions.db",
        routing={"challenger_weight": 0.5},
        server={"batch_max_rows": 32, "batch_wait_ms": 200},
    )
    features = registry.holdout[FEATURES].head(64).reset_index(drop=True)
    with using_tracking_uri(registry.tracking_uri):
        models = {
            registry.versions[alias]: mlflow.pyfunc.load_model(registry.uri_for(alias))
            for alias in ("champion", "challenger")
        }
    with running_server(create_app(settings)) as url, http_client(url) as client:
        wait_ready(client)
        responses = asyncio.run(_fire(url, [_row_body(features, i) for i in range(64)]))
        metrics = scrape(client)

    answers = [r.json() for r in responses]
    assert [r.status_code for r in responses] == [200] * 64, answers
    assert {a["arm"] for a in answers} == {"champion", "challenger"}
    for i, answer in enumerate(answers):
        assert answer["request_id"] == f"b-{i:03d}"
        expected = models[answer["model_version"]].predict(features.iloc[[i]])
        np.testing.assert_allclose(answer["predictions"], expected, rtol=1e-12, atol=1e-15)

    batches = metrics.total("router_batch_rows_count")
    assert metrics.total("router_batch_rows_sum") > batches  # some call scored several rows
    assert metrics.total("router_requests_total", status="ok") == 64

    logged = query_log(
        f"sqlite:///{tmp_path / 'predictions.db'}",
        "SELECT request_id, arm, model_version, status FROM predictions ORDER BY request_id",
    )
    assert logged == [(a["request_id"], a["arm"], a["model_version"], "ok") for a in answers]


def test_a_failing_challenger_in_a_batch_still_falls_back_per_request(
    fresh_registry: FreshRegistry, running_server: RunningServer, tmp_path: Path
) -> None:
    registry = fresh_registry()
    failing = register_pyfunc(
        registry.tracking_uri,
        registry.model_name,
        FailingModel("challenger exploded"),
        registry.holdout[FEATURES],
        alias="challenger",
    )
    settings = router_settings(
        registry,
        tmp_path / "predictions.db",
        routing={"challenger_weight": 1.0},
        server={"batch_max_rows": 32, "batch_wait_ms": 200},
    )
    champion = registry.versions["champion"]
    features = registry.holdout[FEATURES].head(32).reset_index(drop=True)
    n = len(features)
    with running_server(create_app(settings)) as url, http_client(url) as client:
        wait_ready(client)
        responses = asyncio.run(_fire(url, [_row_body(features, i) for i in range(n)]))
        metrics = wait_until(
            lambda: (m := scrape(client)).total("router_fallback_total") == n and m,
            "every fallback counted",
        )

    assert [r.status_code for r in responses] == [200] * n
    assert {(r.json()["arm"], r.json()["model_version"]) for r in responses} == {
        ("champion", champion)
    }
    assert metrics.total("router_requests_total", arm="challenger", status="error") == n
    assert metrics.total("router_requests_total", arm="champion", status="fallback") == n
    rows = query_log(
        f"sqlite:///{tmp_path / 'predictions.db'}",
        "SELECT arm, model_version, status, count(DISTINCT request_id) FROM predictions "
        "GROUP BY arm, model_version, status ORDER BY arm",
    )
    assert rows == [("challenger", failing, "error", n), ("champion", champion, "fallback", n)]
