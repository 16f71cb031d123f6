"""One model's scoring: its own threads, timeout and batcher, and the verdict on each answer.

A :class:`ModelScorer` exists per model in service (per arm). ``score`` either returns a valid
answer or raises exactly one of two things:

- :class:`InputFault`: the model refused *this input* (the client's fault, HTTP 400 as MLflow
  answers): an MLflow ``INVALID_PARAMETER_VALUE`` / ``BAD_REQUEST`` error (pyfunc's schema or
  ``params`` checks), any exception on an input holding missing or non-finite numbers, or any
  exception of a model without an input signature (nothing checked its input before predicting,
  so, as MLflow answers, the input is presumed at fault).
- :class:`ModelFault` with a :class:`~router.logschema.Reason`: any other exception (``error``),
  no answer within the arm's timeout (``timeout``), or an answer of a model that declares its
  outputs that is not one row per input row or holds a non-finite number where the model's kind
  cannot (``invalid_output``). A model without an output signature is served what it answers,
  as ``mlflow models serve`` serves it. An
  exception on input the model's signature fully accepts is a model bug, not the client's.

What a fault means for the request (fallback, 4xx, 5xx) is the service's business, not this one's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException

from router.input.payload import ParsedInput
from router.input.rows import Rows
from router.input.schema import ColumnPlan, column_plan, is_named_columns
from router.logschema import Reason
from router.registry import LoadedModel
from router.scoring.batcher import MicroBatcher
from router.scoring.breaker import CircuitBreaker
from router.scoring.bulkhead import Bulkhead
from router.scoring.flavors import PredictFn
from router.scoring.modelkind import ModelKind, model_kind, output_problem

log = logging.getLogger(__name__)

_CLIENT_ERROR_CODES = frozenset({"INVALID_PARAMETER_VALUE", "BAD_REQUEST"})


class InputFault(Exception):
    """The model refused this input: the client's fault."""


class ModelFault(Exception):
    """The model failed on input it should take: ``reason`` says how."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Scored:
    prediction: Any
    latency_s: float  # the model call's duration (a batched request: the shared call's)


@dataclass(frozen=True)
class ScorerOptions:
    threads: int
    timeout_s: float | None
    batch_max_rows: int
    batch_wait_s: float
    batch_custom_models: bool


class ModelScorer:
    """Scores one model in service (see the module docstring); lives on the event loop."""

    def __init__(
        self,
        model: LoadedModel,
        role: str,
        options: ScorerOptions,
        *,
        predict: PredictFn | None = None,
        breaker: CircuitBreaker | None = None,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self.model = model
        self.role = role
        self.timeout_s = options.timeout_s
        self.breaker = breaker
        # What the router may assume about this model, decided once: how it is called (the
        # flavor's own estimator where proven equal), may it batch, may it answer NaN.
        self.kind: ModelKind = model_kind(
            model.model, model.input_schema, batch_custom_models=options.batch_custom_models
        )
        predictor = self.kind.predictor
        schema = model.input_schema
        # What parsing asks of the signature per request, read from it once.
        self.column_plan: ColumnPlan | None = (
            column_plan(schema) if is_named_columns(schema) else None
        )
        self.bulkhead = Bulkhead(f"{role}-v{model.version}", options.threads)
        self.arriving = 0  # requests for this model being parsed: a batch may wait for them
        self.fallbacks: Counter[str] = Counter()  # requests of this arm the champion answered
        self.batcher = MicroBatcher(
            predict or predictor.predict,
            max_rows=options.batch_max_rows,
            wait_s=options.batch_wait_s,
            run=self.bulkhead.run,
            enabled=self.kind.batchable,
            # An array per call where the model is proven to answer it alike (no DataFrame).
            prepare=Rows.matrix if predictor.takes_numpy and predict is None else Rows.frame,
            pending=lambda: self.arriving,
            on_batch=on_batch,
            name=f"{role}-v{model.version}",
        )

    @property
    def version(self) -> str:
        return self.model.version

    @contextlib.contextmanager
    def arrival(self) -> Iterator[None]:
        """Around a request's parsing: concurrent batches may wait (briefly) to include it."""
        self.arriving += 1
        try:
            yield
        finally:
            self.arriving -= 1
            self.batcher.poke()

    async def score(self, parsed: ParsedInput) -> Scored:
        """A valid answer for ``parsed``, or :class:`InputFault` / :class:`ModelFault`."""
        try:
            async with asyncio.timeout(self.timeout_s) as deadline:
                share = await self.batcher.predict(parsed.model_input, parsed.params)
        except TimeoutError as exc:
            if deadline.expired():
                raise ModelFault(Reason.TIMEOUT, f"no answer within {self.timeout_s:g} s") from exc
            raise _judged(exc, parsed, signed=self.model.input_schema is not None) from exc
        except Exception as exc:  # a model may raise anything: judged here
            raise _judged(exc, parsed, signed=self.model.input_schema is not None) from exc
        problem = output_problem(
            share.prediction,
            parsed.n_rows,
            nonfinite_ok=self.kind.nonfinite_output,
            rows_checked=self.kind.output_declared,
        )
        if problem is not None:
            raise ModelFault(Reason.INVALID_OUTPUT, problem)
        return Scored(share.prediction, share.latency_s)


def _judged(exc: Exception, parsed: ParsedInput, *, signed: bool) -> InputFault | ModelFault:
    if isinstance(exc, MlflowException) and exc.error_code in _CLIENT_ERROR_CODES:
        return InputFault(exc.message)
    if not signed:  # no signature: only the model could check its input (MLflow: 400)
        return InputFault(f"{type(exc).__name__}: {exc}")
    unusable = unusable_columns(parsed.data)
    if unusable:
        return InputFault(
            "the model cannot score missing or non-finite values (NaN, null, Infinity) "
            f"in column(s): {', '.join(unusable)}"
        )
    return ModelFault(Reason.ERROR, f"{type(exc).__name__}: {exc}")


def unusable_columns(data: Any) -> list[str]:
    """Columns holding NaN/null or ±inf (the input's fault when a model then fails)."""
    if isinstance(data, pd.DataFrame):
        bad = data.isna().any(axis=0).to_numpy()
        numeric = data.select_dtypes(include=[np.floating])
        if numeric.size:
            infinite = np.isinf(numeric.to_numpy(dtype=np.float64, na_value=np.nan)).any(axis=0)
            bad = bad | data.columns.isin(numeric.columns[infinite])
        return [str(c) for c in data.columns[bad]]
    if isinstance(data, np.ndarray) and np.issubdtype(data.dtype, np.floating):
        return ["(tensor)"] if not bool(np.isfinite(data).all()) else []
    return []
