"""What a model's input signature asks of a request: its kind, its columns, an input's shape.

A signature of named columns (what ``infer_signature`` gives for a DataFrame) is read once per
model into a :class:`ColumnPlan`; an input's column names are checked against it here
(:func:`check_columns`), its values typed by ``router.input.casting``. Tensor and unnamed-column
signatures are parsed by MLflow; their inputs are checked here for shape only
(:func:`check_shape`), as MLflow checks them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from mlflow.types import ColSpec, DataType, Schema

from router.config import ExtraColumns
from router.errors import InvalidInput


def is_named_columns(schema: Schema | None) -> bool:
    """A signature of named columns: the only kind the router checks and types itself, and the
    only kind it batches."""
    return schema is not None and not schema.is_tensor_spec() and schema.has_input_names()


@dataclass(frozen=True)
class ColumnPlan:
    """What parsing asks of a column signature on every request, read from it once per model
    (MLflow's ``Schema`` accessors rebuild their lists on each call)."""

    names: tuple[str, ...]  # the signature's columns, in its order
    specs: Mapping[str, ColSpec]
    required: tuple[str, ...]
    doubles: frozenset[str]  # the double columns: converted together when plain numbers
    strings: tuple[str, ...]  # the string columns: a CSV's are read as the text sent ("007")


def column_plan(schema: Schema) -> ColumnPlan:
    specs = {
        str(name): spec for name, spec in schema.input_dict().items() if isinstance(spec, ColSpec)
    }
    return ColumnPlan(
        names=tuple(str(name) for name in schema.input_names()),
        specs=specs,
        required=tuple(str(name) for name in schema.required_input_names()),
        doubles=frozenset(name for name, spec in specs.items() if spec.type == DataType.double),
        strings=tuple(name for name, spec in specs.items() if spec.type == DataType.string),
    )


def check_columns(
    columns: Mapping[str, Any],
    plan: ColumnPlan,
    extra_columns: ExtraColumns,
    known_columns: frozenset[str] | None = None,
) -> None:
    """Every required column present; with ``extra_columns="reject"``, no unknown column.

    A column is unknown when the model does not take it or, when ``known_columns`` is given (the
    columns either arm takes, during a schema change), when neither arm takes it: clients then
    send the union of both arms' columns.
    """
    missing = [name for name in plan.required if name not in columns]
    if missing:
        raise InvalidInput(
            f"missing column(s) required by the model signature: {names_text(missing)}"
        )
    if extra_columns != "reject":
        return
    known = plan.specs if known_columns is None else known_columns
    extra = [name for name in columns if name not in known]
    if not extra:
        return
    if known_columns is not None:
        raise InvalidInput(
            f"unknown column(s) in neither arm's model signature: {names_text(extra)}"
        )
    raise InvalidInput(
        f"unknown column(s) not in the model signature: {names_text(extra)} "
        f"(the model takes {names_text(plan.names)}; "
        "validation.extra_columns: ignore drops them)"
    )


def check_shape(data: Any, schema: Schema) -> None:
    """What MLflow parsed for a tensor or unnamed-column signature, checked for its shape."""
    if schema.is_tensor_spec():
        _check_tensor(data, schema)
        return
    want = len(schema.inputs)  # unnamed columns: only their count can be checked (as in MLflow)
    if isinstance(data, pd.DataFrame) and data.shape[1] < want:
        raise InvalidInput(f"the model takes {want} columns, got {data.shape[1]}")


def names_text(names: Sequence[Any]) -> str:
    """Column names as error messages quote them: ``'a', 'b'``."""
    return ", ".join(f"'{name}'" for name in names)


def _check_tensor(data: Any, schema: Schema) -> None:
    specs: list[Any] = schema.inputs  # TensorSpec, as schema.is_tensor_spec()
    if schema.has_input_names():
        names = [str(spec.name) for spec in specs]
        present = set(data) if isinstance(data, dict) else set(getattr(data, "columns", ()))
        missing = [name for name in names if name not in present]
        if missing:
            raise InvalidInput(
                f"missing input(s) required by the model signature: {names_text(missing)}"
            )
        if isinstance(data, dict):
            for spec in specs:
                _check_array(f"input '{spec.name}'", np.asarray(data[str(spec.name)]), spec.shape)
        return
    shape = specs[0].shape
    if isinstance(data, np.ndarray):
        _check_array("the input", data, shape)
    elif (
        isinstance(data, pd.DataFrame)
        and len(shape) == 2
        and shape[1] != -1
        and data.shape[1] not in (1, shape[1])  # one column may hold each row as a list
    ):
        raise InvalidInput(
            f"each row must have {shape[1]} features (model input shape {shape}), "
            f"got {data.shape[1]}"
        )


def _check_array(what: str, array: np.ndarray, shape: tuple[int, ...]) -> None:
    fits = array.ndim == len(shape) and all(
        want == -1 or got == want for got, want in zip(array.shape, shape, strict=True)
    )
    if fits:
        return
    if array.ndim == len(shape) == 2:
        raise InvalidInput(
            f"each row of {what} must have {shape[1]} features (model input shape {shape}), "
            f"got {array.shape[1]}"
        )
    raise InvalidInput(f"{what} has shape {array.shape}; the model expects {shape} (-1: any size)")
