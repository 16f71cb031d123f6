"""Every MLflow function the project reaches that is not MLflow's public API, in one module.

The router answers as ``mlflow models serve`` does by calling the scoring server's own parsing,
schema enforcement and output encoding; none of these is public API (underscored names, and the
``mlflow.utils`` and ``mlflow.pyfunc.scoring_server`` modules), so an MLflow release may move or
change them without notice. Checked against MLflow 3.17 (3.17.2; ``pyproject.toml`` asks for
``mlflow>=3.17``). A name that is gone fails this module's import, so the router does not start;
a changed behaviour shows in ``tests/test_mlflow_compat.py``, which serves the same models with
MLflow's own scoring app and compares the answers case by case: run it after any MLflow upgrade.

The registry (aliases, versions, loading) is public API and has its own seam:
``router/registry.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pandas as pd
from mlflow.models import utils as _model_utils
from mlflow.pyfunc import scoring_server as _scoring_server
from mlflow.tracking._model_registry import utils as _registry_utils
from mlflow.tracking._tracking_service import utils as _tracking_utils
from mlflow.utils import proto_json_utils as _proto_json_utils
from mlflow.utils.proto_json_utils import NumpyEncoder as NumpyEncoder

# The scoring server's parsing of a request body for a model's signature (its casts included).
parse_dataframe: Callable[..., pd.DataFrame] = _proto_json_utils.dataframe_from_parsed_json
parse_tf_serving: Callable[..., Any] = _proto_json_utils.parse_tf_serving_input
parse_csv: Callable[..., pd.DataFrame] = _scoring_server.parse_csv_input
cast_columns: Callable[..., pd.DataFrame] = _proto_json_utils.cast_df_types_according_to_schema

# What ``PyFuncModel.predict`` enforces before calling the model.
enforce_schema: Callable[..., Any] = _model_utils._enforce_schema
enforce_params_schema: Callable[..., Any] = _model_utils._enforce_params_schema

# How the scoring server encodes a prediction (``predictions_to_json``), with ``NumpyEncoder``.
jsonable: Callable[..., Any] = _proto_json_utils._get_jsonable_obj


def global_uris() -> tuple[str | None, str | None]:
    """MLflow's process-wide tracking and registry URIs as set, None where never set.

    ``mlflow.get_tracking_uri()`` cannot tell "never set" from a default it makes up, and only the
    former can be put back as it was.
    """
    return _tracking_utils._tracking_uri, _registry_utils._registry_uri
