"""The benchmark's own MLflow registry (trained into a temporary directory) and request body."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from demo.data import FEATURES, make_churn_data

MODEL_NAME = "churn-predictor"
REPO_ROOT = Path(__file__).resolve().parent.parent
TRAIN_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class BenchRegistry:
    """``MODEL_NAME`` v1 @champion (logistic regression), v2 @challenger (gradient boosting)."""

    root: Path
    model_name: str = MODEL_NAME

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.root / 'mlflow.db'}"

    def uri_for(self, alias: str) -> str:
        return f"models:/{self.model_name}@{alias}"


def train_registry(root: Path, n_rows: int = 20_000, seed: int = 0) -> BenchRegistry:
    """Train and register the demo models into ``root`` with ``python -m demo.train``.

    A subprocess whose working directory is ``root``: MLflow puts the "Default" experiment's
    artifacts under the working directory, and nothing of the benchmark may land in the repo.
    """
    root.mkdir(parents=True, exist_ok=True)
    registry = BenchRegistry(root=root)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    cmd = [
        sys.executable,
        "-m",
        "demo.train",
        "--tracking-uri",
        registry.tracking_uri,
        "--name",
        registry.model_name,
        "--rows",
        str(n_rows),
        "--seed",
        str(seed),
        "--artifact-location",
        str(root / "artifacts" / "training"),
    ]
    out = subprocess.run(
        cmd, cwd=root, env=env, capture_output=True, text=True, timeout=TRAIN_TIMEOUT_S, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"training failed (exit {out.returncode}): {out.stderr[-1500:]}")
    return registry


def demo_row() -> dict[str, Any]:
    """One realistic customer (plain Python values, as a JSON client sends them)."""
    frame = make_churn_data(64, seed=12345)
    record: dict[str, Any] = json.loads(frame[FEATURES].iloc[[7]].to_json(orient="records"))[0]
    return record


def split_body(rows: int = 1) -> str:
    """A ``dataframe_split`` body of ``rows`` copies of :func:`demo_row`."""
    row = demo_row()
    return json.dumps(
        {"dataframe_split": {"columns": FEATURES, "data": [[row[c] for c in FEATURES]] * rows}},
        separators=(",", ":"),
    )


@dataclass(frozen=True)
class BenchModel:
    """One registered model the benchmark serves: where it is, what it is, a request for it."""

    registry: BenchRegistry
    label: str
    body: str


def train_models(root: Path, n_rows: int = 20_000) -> list[BenchModel]:
    """The demo pair (:func:`train_registry`) and the numeric pairs of ``bench/models.py``.

    The numeric pairs are registered in this process under ``root`` (their experiments' artifact
    locations are set explicitly, nothing lands in the working directory).
    """
    from bench.models import PAIRS, breast_cancer_body, register_pair

    demo = train_registry(root, n_rows=n_rows)
    models = [
        BenchModel(
            demo,
            "demo churn: ColumnTransformer pipelines (LogReg @champion, HGB @challenger)",
            split_body(1),
        )
    ]
    labels = {
        "breast-cancer": "breast cancer: StandardScaler+LogReg @champion, depth-4 tree @challenger",
        "breast-cancer-gbm": "breast cancer: HistGradientBoosting @champion, forest @challenger",
    }
    for pair in PAIRS:
        register_pair(demo.tracking_uri, pair)
        models.append(
            BenchModel(BenchRegistry(root, pair.name), labels[pair.name], breast_cancer_body(1))
        )
    return models
