"""Train and register the demo's champion and challenger (and, on request, a worse model).

``train_and_register`` fits two models on :func:`demo.data.make_churn_data`:

* version 1, the weaker champion: logistic regression on the numeric features only;
* version 2, the better challenger: histogram gradient boosting on every feature, categoricals
  one-hot encoded, in one ``Pipeline``.

Every model takes the same input, the full ``FEATURES`` frame (a model that uses fewer columns
drops the rest inside its pipeline), so one request body is valid for both arms. Models are logged
with ``pyfunc_predict_fn="predict_proba"``: pyfunc ``predict`` returns ``[p_no_churn, p_churn]``
per row. They are saved with skops (not pickle); the one sklearn type skops does not trust by
default, HistGradientBoosting's ``TreePredictor``, is named explicitly.

CLI: ``python -m demo.train --tracking-uri sqlite:///mlflow.db --name churn-predictor``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import mlflow.sklearn
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, Schema, TensorSpec
from sklearn.base import BaseEstimator
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, log_loss
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from demo.data import (
    CATEGORICAL_FEATURES,
    FEATURES,
    LABEL,
    NUMERIC_FEATURES,
    make_churn_data,
)
from router.mlflow_private import global_uris

# skops refuses to load types it does not know; these are the ones our models add (the demo's
# gradient boosting; the benchmark's decision tree and random forest, see bench/models.py).
SKOPS_TRUSTED_TYPES: list[str] = [
    "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
    "sklearn.tree._tree.Tree",
]
# Explicit requirements: MLflow otherwise infers them by importing and inspecting the
# environment, which is slow and warns when it cannot pin a version.
PIP_REQUIREMENTS: list[str] = [
    f"mlflow=={mlflow.__version__}",
    f"scikit-learn=={__import__('sklearn').__version__}",
    f"skops=={__import__('skops').__version__}",
    f"pandas=={pd.__version__}",
    f"numpy=={np.__version__}",
]
HOLDOUT_FRACTION = 0.25


@dataclass(frozen=True)
class RegisteredVersion:
    """One registered model version and how it scored on the holdout set."""

    version: str
    run_id: str
    holdout_accuracy: float
    holdout_log_loss: float

    def model_uri(self, model_name: str) -> str:
        return f"models:/{model_name}/{self.version}"


@dataclass(frozen=True)
class RegisteredPair:
    """What :func:`train_and_register` left in the registry."""

    tracking_uri: str
    model_name: str
    champion: RegisteredVersion
    challenger: RegisteredVersion
    # Features + label, never seen in training. Excluded from eq/repr: a DataFrame has neither.
    holdout: pd.DataFrame = field(repr=False, compare=False)

    @property
    def champion_version(self) -> str:
        return self.champion.version

    @property
    def challenger_version(self) -> str:
        return self.challenger.version


@contextmanager
def restored_tracking_uris() -> Iterator[None]:
    """Whatever happens inside, put MLflow's global tracking and registry URIs back afterwards.

    Both the module globals and ``MLFLOW_TRACKING_URI``/``MLFLOW_REGISTRY_URI`` in ``os.environ``
    (``mlflow.set_tracking_uri`` writes the former, for subprocesses) are restored as they were.
    """
    saved_env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    saved_tracking, saved_registry = global_uris()
    try:
        yield
    finally:
        # None unsets the URI: accepted at run time, missing from MLflow's type hints.
        mlflow.set_tracking_uri(saved_tracking)  # type: ignore[arg-type]
        mlflow.set_registry_uri(saved_registry)  # type: ignore[arg-type]
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextmanager
def using_tracking_uri(tracking_uri: str) -> Iterator[None]:
    """Point MLflow's fluent API (tracking and registry) at ``tracking_uri``, then restore."""
    with restored_tracking_uris():
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
        yield


def signature_for(x_example: pd.DataFrame, n_outputs: int = 2) -> ModelSignature:
    """Input columns typed from the frame's dtypes; output a float64 ``(-1, n_outputs)`` tensor.

    Built by hand rather than with ``infer_signature``, which warns about every integer column.
    Integer features stay ``long``: they never have missing values in this data set, and JSON
    clients send them as integers.
    """
    cols: list[ColSpec] = []
    for name, dtype in x_example.dtypes.items():
        if pd.api.types.is_bool_dtype(dtype):
            kind = "boolean"
        elif pd.api.types.is_integer_dtype(dtype):
            kind = "long"
        elif pd.api.types.is_float_dtype(dtype):
            kind = "double"
        elif pd.api.types.is_string_dtype(dtype):
            kind = "string"
        else:
            raise TypeError(f"column {name!r}: no signature type for dtype {dtype}")
        cols.append(ColSpec(kind, str(name)))
    outputs = Schema([TensorSpec(np.dtype(np.float64), (-1, n_outputs))])
    return ModelSignature(inputs=Schema(cols), outputs=outputs)  # type: ignore[arg-type]


def experiment_id(
    client: MlflowClient, experiment_name: str, artifact_location: str | None = None
) -> str:
    """The id of ``experiment_name``, created (with ``artifact_location``) if missing.

    Without a location, a SQLite store keeps a new experiment's artifacts beside its database
    file, not in MLflow's default ``./mlruns`` of whatever directory the process runs in.
    """
    found = client.get_experiment_by_name(experiment_name)
    if found is not None:
        return str(found.experiment_id)
    if artifact_location is None and client.tracking_uri.startswith("sqlite:///"):
        database = Path(client.tracking_uri.removeprefix("sqlite:///"))
        slug = "".join(c if c.isalnum() or c in "-_." else "-" for c in experiment_name)
        artifact_location = str(database.resolve().parent / "artifacts" / slug)
    return str(client.create_experiment(experiment_name, artifact_location=artifact_location))


def register_model(
    tracking_uri: str,
    model_name: str,
    model: BaseEstimator,
    x_example: pd.DataFrame,
    *,
    alias: str | None = None,
    tags: Mapping[str, str] | None = None,
    metrics: Mapping[str, float] | None = None,
    params: Mapping[str, Any] | None = None,
    experiment_name: str | None = None,
    artifact_location: str | None = None,
    run_name: str | None = None,
) -> str:
    """Log a fitted sklearn classifier in a new run, register it, return the version.

    The model must accept ``x_example``'s columns (pass the full ``FEATURES`` frame so every
    version shares one input schema). ``tags`` become model-version tags, ``metrics`` and
    ``params`` run metrics/params. ``alias``, when given, is moved to the new version. The run goes
    to ``experiment_name`` (default ``"<model_name>-training"``), created under
    ``artifact_location`` if it does not exist yet. The version's ``run_id`` names the run.
    """
    example = x_example.head(5)
    signature = signature_for(example, n_outputs=len(model.classes_))
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    exp_id = experiment_id(client, experiment_name or f"{model_name}-training", artifact_location)
    with (
        using_tracking_uri(tracking_uri),
        mlflow.start_run(experiment_id=exp_id, run_name=run_name),
    ):
        if params:
            mlflow.log_params(dict(params))
        if metrics:
            mlflow.log_metrics(dict(metrics))
        with warnings.catch_warnings():
            # MLflow 3.17 compares DataFrame columns with a ``range`` while saving the input
            # example, which pandas 3 deprecates; nothing on our side avoids it.
            warnings.filterwarnings("ignore", message="Operation with range is deprecated")
            info = mlflow.sklearn.log_model(
                model,
                name="model",
                signature=signature,
                input_example=example,
                registered_model_name=model_name,
                pyfunc_predict_fn="predict_proba",
                serialization_format="skops",
                skops_trusted_types=SKOPS_TRUSTED_TYPES,
                pip_requirements=PIP_REQUIREMENTS,
            )
    version = str(info.registered_model_version)
    label_version(client, model_name, version, tags=tags, alias=alias)
    return version


def label_version(
    client: MlflowClient,
    model_name: str,
    version: str,
    *,
    tags: Mapping[str, str] | None = None,
    alias: str | None = None,
) -> None:
    """Tag a freshly registered version and, when given, move ``alias`` to it."""
    for key, value in (tags or {}).items():
        client.set_model_version_tag(model_name, version, key, value)
    if alias is not None:
        client.set_registered_model_alias(model_name, alias, version)


def champion_model(seed: int = 0) -> Pipeline:
    """The weaker model: logistic regression on the numeric features (categoricals dropped)."""
    numeric = ColumnTransformer([("num", StandardScaler(), NUMERIC_FEATURES)], remainder="drop")
    return Pipeline([("features", numeric), ("clf", LogisticRegression(random_state=seed))])


def challenger_model(seed: int = 0) -> Pipeline:
    """The better model: gradient boosting on all features, categoricals one-hot encoded."""
    features = ColumnTransformer(
        [
            ("num", "passthrough", NUMERIC_FEATURES),
            (
                "cat",
                OneHotEncoder(handle_unknown="ignore", sparse_output=False),
                CATEGORICAL_FEATURES,
            ),
        ]
    )
    boosted = HistGradientBoostingClassifier(
        max_iter=200, learning_rate=0.08, max_leaf_nodes=15, random_state=seed
    )
    return Pipeline([("features", features), ("clf", boosted)])


def worse_model(train: pd.DataFrame, *, seed: int = 0) -> Pipeline:
    """A deliberately worse classifier, fitted on ``train`` (features + label).

    Logistic regression on three weakly informative columns with ``class_weight="balanced"``:
    it flags far too many customers as churners, so its accuracy falls well below the
    champion's (and below always answering "no churn"). Same input schema as the others.
    """
    model = _worse_pipeline(seed)
    model.fit(train[FEATURES], train[LABEL])
    return model


def _worse_pipeline(seed: int) -> Pipeline:
    weak = ["age", "avg_monthly_gb", "num_products"]
    return Pipeline(
        [
            ("features", ColumnTransformer([("num", StandardScaler(), weak)], remainder="drop")),
            ("clf", LogisticRegression(class_weight="balanced", random_state=seed)),
        ]
    )


def train_worse_model(
    tracking_uri: str,
    model_name: str,
    *,
    alias: str | None = None,
    n_rows: int = 20_000,
    seed: int = 0,
    experiment_name: str | None = None,
    artifact_location: str | None = None,
) -> str:
    """Fit :func:`worse_model` on ``make_churn_data(n_rows, seed)``, register it; the version.

    For the demo's "deliberately worse challenger" (pass ``alias="challenger"``). Its holdout
    accuracy is logged as a run metric and tagged ``role=worse`` on the version.
    """
    train, holdout = split_holdout(make_churn_data(n_rows, seed), seed)
    return _fit_and_register(
        tracking_uri,
        model_name,
        _worse_pipeline(seed),
        "worse",
        train,
        holdout,
        alias=alias,
        seed=seed,
        experiment_name=experiment_name,
        artifact_location=artifact_location,
    ).version


def holdout_scores(model: BaseEstimator, holdout: pd.DataFrame) -> tuple[float, float]:
    """``(accuracy, log_loss)`` of ``model`` on ``holdout`` (features + label)."""
    proba = model.predict_proba(holdout[FEATURES])
    y = holdout[LABEL].to_numpy()
    accuracy = float(accuracy_score(y, np.argmax(proba, axis=1)))
    return accuracy, float(log_loss(y, proba, labels=[0, 1]))


def split_holdout(
    data: pd.DataFrame, seed: int, fraction: float = HOLDOUT_FRACTION
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(train, holdout)``: a seeded random split, both with a fresh 0..n-1 index."""
    order = np.random.default_rng(seed + 1).permutation(len(data))
    n_holdout = max(1, round(len(data) * fraction))
    holdout = data.iloc[order[:n_holdout]].reset_index(drop=True)
    train = data.iloc[order[n_holdout:]].reset_index(drop=True)
    return train, holdout


def _fit_and_register(
    tracking_uri: str,
    model_name: str,
    model: Pipeline,
    role: str,
    train: pd.DataFrame,
    holdout: pd.DataFrame,
    *,
    alias: str | None,
    seed: int,
    experiment_name: str | None,
    artifact_location: str | None,
) -> RegisteredVersion:
    model.fit(train[FEATURES], train[LABEL])
    accuracy, loss = holdout_scores(model, holdout)
    clf = model.named_steps["clf"]
    version = register_model(
        tracking_uri,
        model_name,
        model,
        train[FEATURES],
        alias=alias,
        tags={"role": role, "estimator": type(clf).__name__},
        metrics={"holdout_accuracy": accuracy, "holdout_log_loss": loss},
        params={"estimator": type(clf).__name__, "n_train": len(train), "seed": seed},
        experiment_name=experiment_name,
        artifact_location=artifact_location,
        run_name=f"{role}-{type(clf).__name__}",
    )
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    run_id = str(client.get_model_version(model_name, version).run_id)
    return RegisteredVersion(version, run_id, accuracy, loss)


def train_and_register(
    tracking_uri: str,
    model_name: str,
    *,
    n_rows: int = 20_000,
    seed: int = 0,
    set_aliases: bool = True,
    experiment_name: str | None = None,
    artifact_location: str | None = None,
) -> RegisteredPair:
    """Fit the champion and challenger on ``make_churn_data(n_rows, seed)`` and register both.

    A quarter of the rows is held out. The champion is registered first, then the challenger, so
    on an empty registry they are versions 1 and 2. With ``set_aliases`` they get ``@champion``
    and ``@challenger``.
    """
    train, holdout = split_holdout(make_churn_data(n_rows, seed), seed)
    common: dict[str, Any] = {
        "seed": seed,
        "experiment_name": experiment_name,
        "artifact_location": artifact_location,
    }
    champion = _fit_and_register(
        tracking_uri,
        model_name,
        champion_model(seed),
        "champion",
        train,
        holdout,
        alias="champion" if set_aliases else None,
        **common,
    )
    challenger = _fit_and_register(
        tracking_uri,
        model_name,
        challenger_model(seed),
        "challenger",
        train,
        holdout,
        alias="challenger" if set_aliases else None,
        **common,
    )
    return RegisteredPair(tracking_uri, model_name, champion, challenger, holdout)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m demo.train",
        description="Train the demo champion (v1) and challenger (v2) and register them.",
    )
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    parser.add_argument("--name", default="churn-predictor", help="registered model name")
    parser.add_argument("--rows", type=int, default=20_000, help="rows generated (25%% held out)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-aliases", action="store_true", help="do not set the aliases")
    parser.add_argument(
        "--artifact-location",
        default=None,
        help="artifact root of the training experiment when it is created (default: MLflow's)",
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    pair = train_and_register(
        args.tracking_uri,
        args.name,
        n_rows=args.rows,
        seed=args.seed,
        set_aliases=not args.no_aliases,
        artifact_location=args.artifact_location,
    )
    elapsed = time.perf_counter() - started
    for role, reg in (("champion", pair.champion), ("challenger", pair.challenger)):
        print(
            f"{args.name} v{reg.version} ({role}): holdout accuracy {reg.holdout_accuracy:.4f}, "
            f"log loss {reg.holdout_log_loss:.4f}, run {reg.run_id}"
        )
    print(f"holdout rows: {len(pair.holdout)}; trained and registered in {elapsed:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
