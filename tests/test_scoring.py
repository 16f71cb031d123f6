"""Scoring parts without a server: each arm's threads, the output check, model kinds, signatures."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, Schema, TensorSpec

from router.input.payload import ParsedInput
from router.registry import LoadedModel, ModelRef
from router.scoring.bulkhead import Bulkhead
from router.scoring.modelkind import model_kind, output_problem
from router.scoring.scorer import InputFault, ModelFault, ModelScorer, Scored, ScorerOptions
from router.scoring.signatures import signature_diff


def test_hung_calls_hold_at_most_the_bulkheads_threads_and_never_another_arms() -> None:
    release = threading.Event()
    started = threading.Semaphore(0)

    def hang() -> str:
        started.release()
        release.wait(30)
        return "late"

    async def main() -> tuple[list[Any], str, int]:
        challenger, champion = Bulkhead("challenger", 2), Bulkhead("champion", 2)
        calls = [asyncio.ensure_future(challenger.run(hang)) for _ in range(5)]
        for _ in range(2):
            await asyncio.to_thread(started.acquire, timeout=30)
        # Two threads hang; the other three calls wait for one of them, starting no thread.
        timed_out = []
        for call in calls[2:]:
            try:
                await asyncio.wait_for(asyncio.shield(call), 0.05)
            except TimeoutError:
                timed_out.append(call)
        threads = challenger.busy
        answer = await champion.run(lambda: "champion")  # the other arm: untouched
        release.set()
        results = await asyncio.gather(*calls)
        return results, answer, threads + 10 * len(timed_out)

    results, answer, counted = asyncio.run(main())
    assert answer == "champion"
    assert results == ["late"] * 5
    assert counted == 2 + 10 * 3


def test_an_abandoned_call_gives_its_thread_back_when_it_returns() -> None:
    release = threading.Event()

    async def main() -> str:
        bulkhead = Bulkhead("one", 1)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(bulkhead.run(lambda: release.wait(30)), 0.05)
        release.set()
        answer = await bulkhead.run(lambda: "next")  # waits for the slot, then gets it
        return answer

    assert asyncio.run(main()) == "next"


OUTPUT_CASES: list[tuple[str, Any, int, bool, str | None]] = [
    ("probabilities", np.array([[0.2, 0.8], [0.5, 0.5]]), 2, False, None),
    ("labels", np.array([1, 0, 1]), 3, False, None),
    ("a frame", pd.DataFrame({"y": [1.0, 2.0]}), 2, False, None),
    ("a series with text", pd.Series(["a", "b"]), 2, False, None),
    ("one row too many", np.zeros((3, 2)), 2, False, "3 output rows for 2 input rows"),
    ("a list too short", [1.0], 2, False, "1 output rows for 2 input rows"),
    ("NaN probability", np.array([[np.nan, np.nan]]), 1, False, "non-finite"),
    ("infinite value", pd.DataFrame({"y": [np.inf], "s": ["x"]}), 1, False, "non-finite"),
    ("NaN allowed by the model", np.array([np.nan]), 1, True, None),
    ("named outputs pass", {"a": np.zeros(5)}, 2, False, None),
]


@pytest.mark.parametrize(
    ("what", "output", "n_rows", "nonfinite_ok", "problem"),
    OUTPUT_CASES,
    ids=[c[0] for c in OUTPUT_CASES],
)
def test_output_problem(
    what: str, output: Any, n_rows: int, nonfinite_ok: bool, problem: str | None
) -> None:
    found = output_problem(output, n_rows, nonfinite_ok=nonfinite_ok)
    if problem is None:
        assert found is None, what
    else:
        assert found is not None and problem in found, what


class _Pyfunc:
    def __init__(self, metadata: dict[str, Any] | None = None, flavor: str = "") -> None:
        self.metadata = Model(metadata=metadata)
        self.loader_module = flavor or "mlflow.pyfunc.model"


COLUMNS = Schema([ColSpec("double", "x"), ColSpec("long", "n")])
TEXT = Schema([ColSpec("double", "x"), ColSpec("string", "s")])


@pytest.mark.parametrize(
    ("independent", "metadata", "schema", "custom", "batchable"),
    [
        (True, None, COLUMNS, False, True),  # sklearn, xgboost, lightgbm (INDEPENDENT_ROW_FLAVORS)
        (True, None, TEXT, False, True),
        (False, None, COLUMNS, False, False),  # a custom pyfunc
        (False, None, COLUMNS, True, True),  # ...with server.batch_custom_models
        (False, {"router_batchable": False}, COLUMNS, True, False),  # opted out all the same
        (True, None, None, False, False),  # no signature: never batched
    ],
)
def test_which_models_are_batched(
    independent: bool, metadata: dict[str, Any] | None, schema: Any, custom: bool, batchable: bool
) -> None:
    model = _Pyfunc(metadata, "mlflow.sklearn" if independent else "")
    kind = model_kind(model, schema, batch_custom_models=custom)
    assert kind.batchable is batchable


def test_signature_diff_names_added_dropped_and_retyped_columns() -> None:
    champion = Schema([ColSpec("double", "a"), ColSpec("long", "b"), ColSpec("string", "c")])
    challenger = Schema([ColSpec("double", "a"), ColSpec("double", "b"), ColSpec("long", "d")])
    diff = signature_diff(champion, challenger)
    assert (diff.added, diff.dropped, diff.retyped) == (("d",), ("c",), (("b", "long", "double"),))
    assert not diff.same
    assert diff.describe() == "challenger adds d; drops c; retypes b (long -> double)"
    assert signature_diff(champion, champion).same
    assert not signature_diff(champion, None).comparable


# --- a scorer's verdicts, with a model whose behaviour the test chooses -------------------------
class _Fake:
    """A pyfunc stand-in: ``behaviour(frame)`` answers; the signature declares its outputs."""

    def __init__(self, behaviour: Any) -> None:
        self.behaviour = behaviour
        self.metadata = Model(
            signature=ModelSignature(COLUMNS, Schema([TensorSpec(np.dtype("float64"), (-1, 2))]))
        )

    def predict(self, data: Any, params: Any = None) -> Any:
        return self.behaviour(data)


def _verdict(
    behaviour: Any, frame: pd.DataFrame, timeout_s: float | None = None, inputs: Any = COLUMNS
) -> Any:
    loaded = LoadedModel(ModelRef("c", "7", None, "alias"), _Fake(behaviour), inputs, 0.0)
    options = ScorerOptions(
        threads=1, timeout_s=timeout_s, batch_max_rows=1, batch_wait_s=0, batch_custom_models=False
    )
    parsed = ParsedInput(
        model_input=frame, n_rows=len(frame), params=None, format="dataframe_split"
    )

    async def main() -> Any:
        try:
            return await ModelScorer(loaded, "challenger", options).score(parsed)
        except (InputFault, ModelFault) as fault:
            return fault

    return asyncio.run(main())


def _raise(exc: BaseException) -> Any:
    def behaviour(frame: pd.DataFrame) -> Any:
        raise exc

    return behaviour


CLEAN = pd.DataFrame({"x": [1.0, 2.0], "n": [1, 2]})
HOLEY = pd.DataFrame({"x": [1.0, np.nan], "n": [1, 2]})
GATE = threading.Event()
VERDICTS: list[tuple[str, Any, pd.DataFrame, str]] = [
    ("an answer", lambda f: np.full((len(f), 2), 0.5), CLEAN, "ok"),
    ("a bug in the model", _raise(RuntimeError("boom")), CLEAN, "error"),
    (
        "MLflow refuses the input",
        _raise(MlflowException("bad", INVALID_PARAMETER_VALUE)),
        CLEAN,
        "input",
    ),
    ("a model failing on NaN input", _raise(ValueError("Input contains NaN")), HOLEY, "input"),
    ("one row too many", lambda f: np.full((len(f) + 1, 2), 0.5), CLEAN, "invalid_output"),
    ("NaN probabilities", lambda f: np.full((len(f), 2), np.nan), CLEAN, "invalid_output"),
    ("no answer in time", lambda f: GATE.wait(30), CLEAN, "timeout"),
]


@pytest.mark.parametrize(
    ("what", "behaviour", "frame", "verdict"), VERDICTS, ids=[v[0] for v in VERDICTS]
)
def test_whose_fault(what: str, behaviour: Any, frame: pd.DataFrame, verdict: str) -> None:
    result = _verdict(behaviour, frame, timeout_s=0.2 if verdict == "timeout" else None)
    if verdict == "timeout":
        GATE.set()  # the hung call returns now (its thread was abandoned, not killed)
    if verdict == "ok":
        assert isinstance(result, Scored), what
    elif verdict == "input":
        assert isinstance(result, InputFault), what
    else:
        assert isinstance(result, ModelFault) and result.reason.value == verdict, (what, result)


def test_a_model_without_input_signature_raising_is_the_inputs_fault() -> None:
    # Nothing checked the input before predicting: as MLflow answers (400), not a model bug.
    failing = _raise(ValueError("X has 1 features, but the model expects 2"))
    assert isinstance(_verdict(failing, CLEAN, inputs=None), InputFault)
    assert isinstance(_verdict(failing, CLEAN), ModelFault)  # the same with a signature: a bug
