"""The benchmark's model kinds beside the demo pair: numeric-only pipelines on sklearn's
breast-cancer data (30 double columns, shipped with sklearn: nothing is downloaded).

* ``breast-cancer``: ``StandardScaler + LogisticRegression`` @champion, a depth-4 decision tree
  @challenger (issue 10's model: a numeric pipeline that can take a plain array);
* ``breast-cancer-gbm``: ``HistGradientBoostingClassifier`` @champion (a third kind: gradient
  boosting, no preprocessing), a small random forest @challenger.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd
from sklearn.base import BaseEstimator
from sklearn.datasets import load_breast_cancer
from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.tree import DecisionTreeClassifier

from demo.train import register_model

BREAST_CANCER = "breast-cancer"
BREAST_CANCER_GBM = "breast-cancer-gbm"


def breast_cancer_frame() -> tuple[pd.DataFrame, pd.Series]:
    """Features (30 float64 columns, sklearn's names) and the 0/1 label."""
    data = load_breast_cancer(as_frame=True)
    return data.data, data.target


def scaled_logistic(seed: int = 0) -> Pipeline:
    return Pipeline(
        [("scale", StandardScaler()), ("clf", LogisticRegression(max_iter=1000, random_state=seed))]
    )


def small_tree(seed: int = 0) -> DecisionTreeClassifier:
    return DecisionTreeClassifier(max_depth=4, random_state=seed)


def gradient_boosting(seed: int = 0) -> HistGradientBoostingClassifier:
    return HistGradientBoostingClassifier(max_iter=50, random_state=seed)


def small_forest(seed: int = 0) -> RandomForestClassifier:
    return RandomForestClassifier(n_estimators=20, max_depth=6, random_state=seed, n_jobs=1)


@dataclass(frozen=True)
class ModelPair:
    """A registered model's champion and challenger estimators (unfitted factories)."""

    name: str
    champion: Callable[[int], BaseEstimator]
    challenger: Callable[[int], BaseEstimator]


PAIRS: tuple[ModelPair, ...] = (
    ModelPair(BREAST_CANCER, scaled_logistic, small_tree),
    ModelPair(BREAST_CANCER_GBM, gradient_boosting, small_forest),
)


def register_pair(tracking_uri: str, pair: ModelPair, seed: int = 0) -> None:
    """Fit both on the breast-cancer data; register v1 @champion and v2 @challenger."""
    x, y = breast_cancer_frame()
    for alias, factory in (("champion", pair.champion), ("challenger", pair.challenger)):
        model = factory(seed).fit(x, y)
        register_model(
            tracking_uri,
            pair.name,
            model,
            x,
            alias=alias,
            tags={"role": alias, "estimator": type(model).__name__},
            experiment_name=f"{pair.name}-training",
            run_name=f"{alias}-{type(model).__name__}",
        )


def breast_cancer_body(rows: int = 1) -> str:
    """A ``dataframe_split`` body of ``rows`` copies of one patient (30 numbers)."""
    x, _ = breast_cancer_frame()
    row = [float(v) for v in x.iloc[7]]
    return json.dumps(
        {"dataframe_split": {"columns": [str(c) for c in x.columns], "data": [row] * rows}},
        separators=(",", ":"),
    )
