"""The micro-batcher: unit tests with a fake predict, then end to end under real uvicorn.

Unit tests run the batcher on an event loop with an inline runner (no threads), so what they
assert is the structure of the model calls (how many, with how many rows), never a duration.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import httpx
import mlflow
import numpy as np
import pandas as pd
import pytest

from demo.data import FEATURES
from demo.train import using_tracking_uri
from router.input.rows import Rows
from router.scoring.batcher import BatchScore, MicroBatcher, split_output
from tests.conftest import FreshRegistry, RunningRouter
from tests.live_router import RouterDir, wait_until
from tests.metrics_text import scrape
from tests.pyfunc_models import FailingModel, RequestNormalisedModel, register_in

T = TypeVar("T")
NEVER_S = 3600.0  # a wait no test could sit through: reaching the assertion means no wait


class FakeModel:
    """Counts calls and their row counts; scores ``x * 10``; refuses negative ``x``."""

    def __init__(self, shape: str = "array") -> None:
        self.calls: list[int] = []
        self.shape = shape

    def __call__(self, frame: pd.DataFrame, params: dict[str, Any] | None = None) -> Any:
        self.calls.append(len(frame))
        if (frame["x"] < 0).any():
            raise ValueError("negative x")
        values = frame["x"].to_numpy() * 10.0
        if self.shape == "series":
            return pd.Series(values, name="y", index=frame.index)
        if self.shape == "frame":
            return pd.DataFrame({"y": values, "z": -values})
        if self.shape == "list":
            return values.tolist()
        if self.shape == "proba":
            return np.column_stack([1 - values / 100, values / 100])
        return values


async def _inline(fn: Callable[[], Any]) -> Any:
    return fn()


def _frame(*xs: float, index: list[Any] | None = None) -> Rows:
    """One request's checked rows of a one-column signature (``x``: double)."""
    return Rows(("x",), (np.array(xs, dtype=np.float64),), len(xs), index)


def _batcher(model: Callable[..., Any], **kw: Any) -> MicroBatcher:
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


async def _queued(batcher: MicroBatcher, frames: list[Rows]) -> list[BatchScore]:
    """Submit every frame within one loop turn (as concurrent requests arrive)."""
    return list(await asyncio.gather(*(batcher.predict(f) for f in frames)))


@pytest.mark.parametrize("shape", ["array", "proba", "series", "frame", "list"])
def test_concurrent_requests_share_one_call_and_get_what_they_would_get_alone(shape: str) -> None:
    model = FakeModel(shape)
    frames = [_frame(1.0), _frame(2.0, 3.0), _frame(4.0)]

    scores = _run(lambda: _queued(_batcher(model), frames))
    assert model.calls == [4]  # requests queued within one loop turn share one call
    for frame, score in zip(frames, scores, strict=True):
        alone = FakeModel(shape)(frame.frame())
        assert _as_list(score.prediction) == _as_list(alone)
        if isinstance(alone, pd.Series | pd.DataFrame):
            assert score.prediction.index.equals(alone.index)


def test_a_client_index_reaches_the_model_and_comes_back_per_request() -> None:
    model = FakeModel("series")
    frames = [_frame(1.0), _frame(2.0, index=["a"]), _frame(3.0, 4.0, index=[7, 9])]

    scores = _run(lambda: _queued(_batcher(model), frames))
    assert model.calls == [4]
    assert [list(s.prediction.index) for s in scores] == [[0], ["a"], [7, 9]]
    assert [s.prediction.tolist() for s in scores] == [[10.0], [20.0], [30.0, 40.0]]


def test_a_lone_request_is_scored_at_once_even_with_a_long_wait() -> None:
    model = FakeModel()

    async def main() -> BatchScore:
        batcher = _batcher(model, pending=lambda: 0)
        task = asyncio.ensure_future(batcher.predict(_frame(5.0)))
        await _spin()
        assert model.calls == [1]  # called within a few loop turns: nothing was waited for
        return await task

    assert _run(main).prediction.tolist() == [50.0]


def test_a_batch_waits_for_requests_still_being_parsed_and_not_after_they_are_done() -> None:
    model = FakeModel()
    parsing = [2]

    async def main() -> None:
        batcher = _batcher(model, pending=lambda: parsing[0])
        first = asyncio.ensure_future(batcher.predict(_frame(1.0)))
        await _spin()
        assert model.calls == []  # two requests for this model are still being parsed
        parsing[0] = 1
        second = asyncio.ensure_future(batcher.predict(_frame(2.0)))
        await _spin()
        assert model.calls == []  # one still is
        parsing[0] = 0  # ...and it turned out to be bad input
        batcher.poke()
        await _spin()
        assert model.calls == [2]
        assert (await first).prediction.tolist() == [10.0]
        assert (await second).prediction.tolist() == [20.0]
        assert batcher.idle

    _run(main)


def test_a_full_batch_does_not_wait_and_max_rows_bounds_each_call() -> None:
    model = FakeModel()
    observed: list[int] = []
    parsing = [10]

    async def main() -> None:
        batcher = _batcher(model, max_rows=2, on_batch=observed.append, pending=lambda: parsing[0])
        tasks = [asyncio.ensure_future(batcher.predict(_frame(float(i)))) for i in range(5)]
        await _spin()
        assert model.calls == [2, 2]  # the fifth waits for company
        parsing[0] = 0
        batcher.poke()
        results = await asyncio.gather(*tasks)
        assert [r.prediction.tolist() for r in results] == [[float(i * 10)] for i in range(5)]

    _run(main)
    assert model.calls == [2, 2, 1]
    assert observed == [2, 2, 1]


def test_what_the_batcher_does_not_take_is_one_call_of_its_own() -> None:
    model = FakeModel()

    async def main() -> list[BatchScore]:
        batcher = _batcher(model, max_rows=3)
        off = _batcher(model, enabled=False)
        return [
            *await _queued(batcher, [_frame(1.0), _frame(1.0, 2.0, 3.0), _frame(2.0)]),
            *await _queued(off, [_frame(1.0), _frame(2.0)]),
        ]

    _run(main)
    # a request of max_rows rows goes alone at once; with batching off, every request does
    assert model.calls == [3, 2, 1, 1]


def test_params_are_never_shared_between_requests() -> None:
    seen: list[Any] = []

    def model(frame: pd.DataFrame, params: dict[str, Any] | None) -> np.ndarray:
        seen.append((len(frame), params))
        return frame["x"].to_numpy()

    async def main() -> None:
        batcher = _batcher(model)
        await asyncio.gather(
            batcher.predict(_frame(1.0), {"k": 1}), batcher.predict(_frame(2.0), {"k": 2})
        )

    _run(main)
    assert sorted(seen, key=str) == [(1, {"k": 1}), (1, {"k": 2})]


def test_a_failing_row_fails_only_its_own_request_and_is_retried_once() -> None:
    model = FakeModel()

    async def main() -> list[Any]:
        batcher = _batcher(model)
        frames = [_frame(1.0), _frame(-1.0), _frame(2.0, 3.0)]
        return list(
            await asyncio.gather(*(batcher.predict(f) for f in frames), return_exceptions=True)
        )

    good, bad, also_good = _run(main)
    assert model.calls == [4, 1, 1, 2]  # the batch, then each of its requests once more
    assert isinstance(bad, ValueError)
    assert good.prediction.tolist() == [10.0]
    assert also_good.prediction.tolist() == [20.0, 30.0]


def test_an_output_not_one_per_row_turns_batching_off() -> None:
    calls: list[int] = []

    def total(frame: pd.DataFrame, params: Any) -> np.ndarray:
        calls.append(len(frame))
        return np.array([frame["x"].sum()])  # one value per call, whatever the rows

    async def main() -> tuple[list[BatchScore], bool]:
        batcher = _batcher(total)
        scores = await _queued(batcher, [_frame(1.0, 2.0), _frame(5)])
        return scores, batcher.enabled

    scores, enabled = _run(main)
    assert calls == [3, 2, 1]
    assert [s.prediction.tolist() for s in scores] == [[3.0], [5.0]]
    assert not enabled  # this model is scored alone from now on


def test_rows_of_different_dtypes_are_not_joined() -> None:
    model = FakeModel()
    as_int = Rows(("x",), (np.array([7], dtype=np.int64),), 1)

    scores = _run(lambda: _queued(_batcher(model), [_frame(1.0), as_int, _frame(2)]))
    assert model.calls == [2, 1]
    assert [s.prediction.tolist() for s in scores] == [[10.0], [70], [20.0]]


def test_a_request_that_went_away_is_not_scored() -> None:
    model = FakeModel()

    async def main() -> None:
        parsing = [1]
        batcher = _batcher(model, pending=lambda: parsing[0])
        gone = asyncio.ensure_future(batcher.predict(_frame(1.0)))
        kept = asyncio.ensure_future(batcher.predict(_frame(2.0)))
        await _spin()
        gone.cancel()  # e.g. its timeout expired
        parsing[0] = 0
        batcher.poke()
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
    assert [list(p.index) for p in pieces] == [[7, 8], [9]]


# --- end to end ------------------------------------------------------------------------------


def _row_body(frame: pd.DataFrame, i: int) -> dict[str, Any]:
    row = frame.iloc[[i]]
    return {"dataframe_split": {"columns": list(row.columns), "data": row.to_numpy().tolist()}}


async def _fire(base_url: httpx.URL | str, bodies: list[dict[str, Any]]) -> list[httpx.Response]:
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
    fresh_registry: FreshRegistry, running_router: RunningRouter, router_dir: RouterDir
) -> None:
    registry = fresh_registry()
    # A long wait makes batches certain (the batch leaves once no announced request is parsing).
    settings = router_dir.settings(
        registry,
        routing={"challenger_weight": 0.5},
        server={"batch_max_rows": 32, "batch_wait_ms": 200},
    )
    features = registry.holdout[FEATURES].head(64).reset_index(drop=True)
    with using_tracking_uri(registry.tracking_uri):
        models = {
            registry.versions[alias]: mlflow.pyfunc.load_model(registry.uri_for(alias))
            for alias in ("champion", "challenger")
        }
    with running_router(settings) as client:
        responses = asyncio.run(_fire(client.base_url, [_row_body(features, i) for i in range(64)]))
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

    logged = router_dir.log_rows(
        "SELECT request_id, arm, model_version, status FROM predictions ORDER BY request_id",
    )
    assert logged == [(a["request_id"], a["arm"], a["model_version"], "ok") for a in answers]


def test_a_failing_batched_challenger_falls_back_per_request(
    fresh_registry: FreshRegistry, running_router: RunningRouter, router_dir: RouterDir
) -> None:
    registry = fresh_registry()
    failing = register_in(
        registry,
        FailingModel("challenger exploded"),
        alias="challenger",
        metadata={"router_batchable": True},  # a custom model opting in
    )
    settings = router_dir.settings(
        registry,
        routing={"challenger_weight": 1.0, "breaker_failures": 1000},
        server={"batch_max_rows": 32, "batch_wait_ms": 200},
    )
    champion = registry.versions["champion"]
    features = registry.holdout[FEATURES].head(32).reset_index(drop=True)
    n = len(features)
    with running_router(settings) as client:
        responses = asyncio.run(_fire(client.base_url, [_row_body(features, i) for i in range(n)]))
        metrics = wait_until(
            lambda: (m := scrape(client)).total("router_fallback_total") == n and m,
            "every fallback counted",
        )

    assert [r.status_code for r in responses] == [200] * n
    assert {(r.json()["arm"], r.json()["model_version"]) for r in responses} == {
        ("champion", champion)
    }
    assert metrics.total("router_fallback_total", reason="error") == n
    assert metrics.total("router_requests_total", arm="challenger", status="fallback") == n
    assert metrics.total("router_requests_total", arm="champion") == 0
    rows = router_dir.log_rows(
        "SELECT arm, model_version, status, reason, count(DISTINCT request_id) FROM predictions "
        "GROUP BY arm, model_version, status, reason",
    )
    assert rows == [("challenger", champion, "fallback", "error", n)]
    assert failing != champion


def test_a_custom_model_whose_rows_depend_on_each_other_is_not_batched(
    fresh_registry: FreshRegistry, running_router: RunningRouter, router_dir: RouterDir
) -> None:
    registry = fresh_registry()
    version = register_in(registry, RequestNormalisedModel("monthly_charges"), alias="champion")
    settings = router_dir.settings(
        registry,
        routing={"challenger_weight": 0.0},
        server={"batch_max_rows": 32, "batch_wait_ms": 200},
    )
    features = registry.holdout[FEATURES].head(32).reset_index(drop=True)
    n = len(features)
    with running_router(settings) as client:
        responses = asyncio.run(_fire(client.base_url, [_row_body(features, i) for i in range(n)]))
        metrics = scrape(client)

    assert [r.status_code for r in responses] == [200] * n
    assert {r.json()["model_version"] for r in responses} == {version}
    # Alone, every one-row request is exactly at its own mean: any shared call would differ.
    assert [r.json()["predictions"] for r in responses] == [[[0.5, 0.5]]] * n
    assert metrics.total("router_batch_rows_sum") == metrics.total("router_batch_rows_count") == n
