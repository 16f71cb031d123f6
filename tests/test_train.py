"""Demo data, training/registration, and the shared registry and server fixtures."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import mlflow
import numpy as np
import pandas as pd
import pytest
from conftest import FreshRegistry, MlflowRegistry
from pyfunc_models import ConstantModel, FailingModel, SlowModel, register_pyfunc
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from demo.data import FEATURES, LABEL, make_churn_data
from demo.train import (
    holdout_scores,
    main,
    register_model,
    train_worse_model,
    using_tracking_uri,
    worse_model,
)


def test_churn_data_is_deterministic_and_plausible() -> None:
    first = make_churn_data(2_000, seed=7)
    pd.testing.assert_frame_equal(first, make_churn_data(2_000, seed=7))
    assert not first.equals(make_churn_data(2_000, seed=8))
    assert list(first.columns) == [*FEATURES, LABEL]
    assert first[LABEL].isin([0, 1]).all()
    assert 0.2 <= first[LABEL].mean() <= 0.3
    assert first["tenure_months"].dtype == np.int64
    assert set(first["contract"]) == {"month-to-month", "one-year", "two-year"}
    assert not first.isna().any().any()


def test_make_churn_data_rejects_empty() -> None:
    with pytest.raises(ValueError, match="n_rows"):
        make_churn_data(0, seed=0)


def test_registry_has_aliases_and_challenger_beats_champion(
    mlflow_registry: MlflowRegistry,
) -> None:
    client = mlflow_registry.client()
    for alias, version in (("champion", "1"), ("challenger", "2")):
        assert mlflow_registry.versions[alias] == version
        mv = client.get_model_version_by_alias(mlflow_registry.model_name, alias)
        assert str(mv.version) == version
        assert mv.run_id == mlflow_registry.run_ids[alias]
    acc = mlflow_registry.holdout_accuracy
    assert acc["challenger"] > acc["champion"] + 0.02, acc


def test_pyfunc_predict_returns_probabilities_with_signature(
    mlflow_registry: MlflowRegistry,
) -> None:
    holdout = mlflow_registry.holdout
    for alias in ("champion", "challenger"):
        uri = f"models:/{mlflow_registry.model_name}/{mlflow_registry.versions[alias]}"
        with using_tracking_uri(mlflow_registry.tracking_uri):
            info = mlflow.models.get_model_info(uri)
            model = mlflow.pyfunc.load_model(uri)
        assert info.signature is not None
        assert info.signature.inputs.input_names() == FEATURES
        proba = np.asarray(model.predict(holdout[FEATURES]))
        assert proba.shape == (len(holdout), 2)
        np.testing.assert_allclose(proba.sum(axis=1), 1.0)
        accuracy = float((proba.argmax(axis=1) == holdout[LABEL].to_numpy()).mean())
        assert accuracy == pytest.approx(mlflow_registry.holdout_accuracy[alias])


def test_fresh_registry_is_an_independent_copy(
    mlflow_registry: MlflowRegistry, fresh_registry: FreshRegistry
) -> None:
    copy = fresh_registry()
    assert copy.tracking_uri != mlflow_registry.tracking_uri
    with using_tracking_uri(copy.tracking_uri):
        model = mlflow.pyfunc.load_model(copy.uri_for("challenger"))
    assert np.asarray(model.predict(copy.holdout[FEATURES].head(3))).shape == (3, 2)
    client = copy.client()
    storage = client.get_model_version(copy.model_name, "2").source
    assert str(mlflow_registry.root) not in str(storage)

    # Writes to the copy: a worse model registered there, its artifacts inside the copy.
    worse = worse_model(make_churn_data(2_000, seed=1))
    worse_acc, _ = holdout_scores(worse, copy.holdout)
    assert worse_acc < copy.holdout_accuracy["champion"] - 0.05
    version = register_model(
        copy.tracking_uri, copy.model_name, worse, copy.holdout[FEATURES], alias="challenger"
    )
    assert version == "3"
    assert str(client.get_model_version_by_alias(copy.model_name, "challenger").version) == "3"
    run_id = str(client.get_model_version(copy.model_name, version).run_id)
    assert Path(client.get_run(run_id).info.artifact_uri).is_relative_to(copy.root)
    assert train_worse_model(copy.tracking_uri, copy.model_name, n_rows=1_000) == "4"

    # ...and none of it visible in the session registry or in a second copy.
    session = mlflow_registry.client()
    assert str(session.get_model_version_by_alias(copy.model_name, "challenger").version) == "2"
    other = fresh_registry().client()
    assert str(other.get_model_version_by_alias(copy.model_name, "challenger").version) == "2"


def test_pyfunc_test_models(fresh_registry: FreshRegistry) -> None:
    reg = fresh_registry()
    x = reg.holdout[FEATURES].head(4)
    v_const = register_pyfunc(reg.tracking_uri, reg.model_name, ConstantModel(0.8), x)
    v_slow = register_pyfunc(reg.tracking_uri, reg.model_name, SlowModel(0.05, p=0.2), x)
    v_fail = register_pyfunc(
        reg.tracking_uri, reg.model_name, FailingModel("nope"), x, alias="challenger"
    )
    v_code = register_pyfunc(
        reg.tracking_uri, reg.model_name, ConstantModel(0.3), x, include_code=True
    )
    assert (v_const, v_slow, v_fail, v_code) == ("3", "4", "5", "6")
    with using_tracking_uri(reg.tracking_uri):
        const = mlflow.pyfunc.load_model(f"models:/{reg.model_name}/{v_const}")
        slow = mlflow.pyfunc.load_model(f"models:/{reg.model_name}/{v_slow}")
        failing = mlflow.pyfunc.load_model(reg.uri_for("challenger"))
        with_code = mlflow.pyfunc.load_model(f"models:/{reg.model_name}/{v_code}")
    np.testing.assert_allclose(const.predict(x), [[0.2, 0.8]] * 4)
    np.testing.assert_allclose(with_code.predict(x), [[0.7, 0.3]] * 4)
    np.testing.assert_allclose(slow.predict(x), [[0.8, 0.2]] * 4)
    with pytest.raises(RuntimeError, match="nope"):
        failing.predict(x)


def test_using_tracking_uri_restores_globals_and_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///outer.db")
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    inner = f"sqlite:///{tmp_path / 'inner.db'}"
    before = mlflow.get_tracking_uri()
    with using_tracking_uri(inner):
        assert mlflow.get_tracking_uri() == inner
        assert mlflow.get_registry_uri() == inner
    assert os.environ["MLFLOW_TRACKING_URI"] == "sqlite:///outer.db"
    assert "MLFLOW_REGISTRY_URI" not in os.environ
    assert mlflow.get_tracking_uri() == before


def test_running_server_runs_the_lifespan(
    running_server: Callable[..., contextlib.AbstractContextManager[str]],
) -> None:
    events: list[str] = []

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        events.append("startup")
        yield
        events.append("shutdown")

    async def hello(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route("/hello", hello)], lifespan=lifespan)
    with running_server(app) as base_url:
        assert events == ["startup"]
        assert httpx.get(f"{base_url}/hello").json() == {"ok": True}
    assert events == ["startup", "shutdown"]


def test_running_server_reports_a_failed_startup(
    running_server: Callable[..., contextlib.AbstractContextManager[str]],
) -> None:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        raise RuntimeError("no champion")
        yield

    with (
        pytest.raises(RuntimeError, match="stopped during startup"),
        running_server(Starlette(lifespan=lifespan)),
    ):
        pass


def test_cli_trains_and_registers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # MLflow's "Default" experiment points at ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = main(
        [
            "--tracking-uri",
            uri,
            "--name",
            "cli-model",
            "--rows",
            "1500",
            "--artifact-location",
            str(tmp_path / "artifacts"),
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "cli-model v1 (champion)" in out
    assert "cli-model v2 (challenger)" in out
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert str(client.get_model_version_by_alias("cli-model", "challenger").version) == "2"
