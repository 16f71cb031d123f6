"""The cheapest faithful call of a loaded model: its flavor's own estimator, else pyfunc.

``PyFuncModel.predict`` enforces the input schema on every call (a second time, behind the
router's own checks), reads ``inspect.signature`` of the predict function and opens a prediction
context: on a one-row request that is about 40% of the CPU (profile in issue 12). For an sklearn
model with a column signature, once the router has checked and cast the input as MLflow's schema
enforcement would (a typed DataFrame in signature order, ``router.input.payload``), pyfunc ends by
calling the estimator's ``predict`` (or the ``pyfunc_predict_fn`` it was logged with) on that very
frame: calling it directly gives the same answer for less. LightGBM's pyfunc likewise ends in the
booster's or estimator's ``predict``. ``tests/test_flavors.py`` proves the equality against
``pyfunc.predict`` on 1,000 rows per model kind.

Numpy: sklearn validates a DataFrame (feature names, per-column dtypes) on every call, a fixed
cost a plain array skips. A model takes a float array instead of its frame only when all its
columns are numeric and, at load, a probe frame built from the signature gives exactly the same
output both ways (a ``ColumnTransformer`` selecting columns by name fails the probe).

Anything else (other flavors, tensor or missing signatures, signatures from type hints, requests
with ``params``, non-DataFrame input) goes through ``pyfunc.predict`` unchanged.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from mlflow.types import DataType, Schema

from router.input.rows import Rows
from router.input.schema import is_named_columns

log = logging.getLogger(__name__)

PYFUNC = "pyfunc"
# Flavors whose pyfunc ends in one call of the raw model (see ``_flavor_predict_fn``).
_DIRECT_FLAVORS = frozenset({"mlflow.sklearn", "mlflow.lightgbm"})
# The predict functions pyfunc may call on an sklearn estimator (``pyfunc_predict_fn``).
_SKLEARN_PREDICT_FNS = frozenset(
    {"predict", "predict_proba", "predict_log_proba", "predict_joint_log_proba", "score"}
)
# Column types the router's parser builds exactly as MLflow's ``_enforce_schema`` does.
_FAST_TYPES = frozenset(
    {
        DataType.double,
        DataType.float,
        DataType.long,
        DataType.integer,
        DataType.boolean,
        DataType.string,
    }
)
_NUMERIC_TYPES = frozenset({DataType.double, DataType.float, DataType.long, DataType.integer})
_PROBE_ROWS = 16
# A model fitted on a DataFrame warns on every array call; the array is proven equivalent.
_NO_NAMES_WARNING = "X does not have valid feature names"

Params = dict[str, Any] | None
PredictFn = Callable[[Any, Params], Any]


@dataclass(frozen=True)
class Predictor:
    """How the router calls one loaded model.

    ``predict(data, params)`` takes what ``PyFuncModel.predict`` takes, with one promise from the
    caller: a DataFrame has passed the router's checks (signature columns, in order, typed).
    With ``takes_numpy`` the caller may also pass a 2-D array of those columns in that order
    (:meth:`router.input.rows.Rows.matrix`), skipping the DataFrame entirely.
    """

    predict: PredictFn
    flavor: str  # the pyfunc loader module ("mlflow.sklearn"...), or "pyfunc" when unknown
    fast: bool  # calls the flavor's estimator directly (False: every call goes through pyfunc)
    takes_numpy: bool  # a float array of the signature's columns gives the same answers


def predictor_for(model: Any) -> Predictor:
    """The predictor for a loaded ``mlflow.pyfunc.PyFuncModel`` (never raises for odd models)."""
    flavor = _loader_module(model) or PYFUNC
    pyfunc_predict = _pyfunc_predict(model)
    estimator_fn = _flavor_predict_fn(model, flavor)
    if estimator_fn is None:
        return Predictor(pyfunc_predict, flavor, False, False)
    schema: Schema = model.metadata.get_input_schema()
    takes_numpy = _numeric(schema) and _numpy_is_equal(estimator_fn, schema)
    fast = _fast_predict(estimator_fn, pyfunc_predict, takes_numpy)
    return Predictor(fast, flavor, True, takes_numpy)


def _loader_module(model: Any) -> str | None:
    try:
        module = model.loader_module
    except AttributeError:
        return None
    return module if isinstance(module, str) else None


def _pyfunc_predict(model: Any) -> PredictFn:
    def predict(data: Any, params: Params) -> Any:
        if params:
            return model.predict(data, params=params)
        return model.predict(data)

    return predict


def _flavor_predict_fn(model: Any, flavor: str) -> Callable[[Any], Any] | None:
    """The raw model's bound function pyfunc would end in, when skipping pyfunc is safe.

    sklearn's pyfunc calls the estimator's ``pyfunc_predict_fn`` on the enforced frame, and
    lightgbm's calls ``predict`` (``mlflow.lightgbm._LGBModelWrapper``), nothing else. xgboost's
    wrapper converts frames itself (``DMatrix``, feature checks): it stays on pyfunc.
    """
    if flavor not in _DIRECT_FLAVORS:
        return None
    meta = model.metadata
    schema = meta.get_input_schema()
    if (
        not is_named_columns(schema)
        or any(spec.type not in _FAST_TYPES for spec in schema.inputs)
        or meta._is_signature_from_type_hint()
        or meta._is_type_hint_from_example()
    ):
        return None
    name = "predict"
    if flavor == "mlflow.sklearn":
        name = meta.flavors.get("python_function", {}).get("predict_fn", "predict")
    if name not in _SKLEARN_PREDICT_FNS:
        return None
    fn = getattr(model.get_raw_model(), name, None)
    return fn if callable(fn) else None


def _fast_predict(
    estimator_fn: Callable[[Any], Any], pyfunc_predict: PredictFn, takes_numpy: bool
) -> PredictFn:
    def predict(data: Any, params: Params) -> Any:
        if params:
            return pyfunc_predict(data, params)  # MLflow validates params against their schema
        if isinstance(data, np.ndarray) and takes_numpy:
            return _without_names(estimator_fn, data)
        if isinstance(data, pd.DataFrame):
            if takes_numpy:
                return _without_names(estimator_fn, data.to_numpy())
            return estimator_fn(data)
        return pyfunc_predict(data, params)

    return predict


def _without_names(estimator_fn: Callable[[Any], Any], array: np.ndarray) -> Any:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NO_NAMES_WARNING)
        return estimator_fn(array)


def _numeric(schema: Schema) -> bool:
    return all(spec.type in _NUMERIC_TYPES for spec in schema.inputs)


def probe_rows(schema: Schema, rows: int = _PROBE_ROWS) -> Rows:
    """Deterministic numeric rows typed as the router's parser types them, in signature order."""
    rng = np.random.default_rng(0)
    arrays: list[np.ndarray] = []
    for spec in schema.inputs:
        values = rng.normal(0.0, 3.0, size=rows)
        kind = spec.type
        if not isinstance(kind, DataType) or kind not in _NUMERIC_TYPES:
            raise ValueError(f"column {spec.name!r}: the probe is numeric, not {kind}")
        dtype = kind.to_numpy()
        integral = np.issubdtype(dtype, np.integer)
        arrays.append((np.round(values) if integral else values).astype(dtype))
    return Rows(tuple(str(name) for name in schema.input_names()), tuple(arrays), rows)


def probe_frame(schema: Schema, rows: int = _PROBE_ROWS) -> pd.DataFrame:
    return probe_rows(schema, rows).frame()


def _numpy_is_equal(estimator_fn: Callable[[Any], Any], schema: Schema) -> bool:
    """Does the estimator answer a probe's array (as the batcher builds it) exactly as it answers
    the probe's frame?"""
    probe = probe_rows(schema)
    try:
        expected = estimator_fn(probe.frame())
        actual = _without_names(estimator_fn, probe.matrix())
    except Exception as exc:  # noqa: BLE001 - a model may raise anything: then it gets frames
        log.info("model takes DataFrames only (array probe failed: %s)", exc)
        return False
    return same_output(expected, actual)


def same_output(a: Any, b: Any) -> bool:
    """Exactly the same prediction: type, shape, dtype and values (NaN equal to NaN)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, np.ndarray):
        return (
            a.shape == b.shape
            and a.dtype == b.dtype
            and bool(np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"))
        )
    if isinstance(a, pd.DataFrame | pd.Series):
        return bool(a.equals(b))
    return bool(a == b)
