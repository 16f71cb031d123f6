"""Shared fixtures: a real MLflow registry on SQLite, cheap copies of it, and real uvicorn servers.

Registry layout (one directory per registry, nothing shared between them)::

    <root>/mlflow.db        tracking + registry store (``tracking_uri = sqlite:///<root>/mlflow.db``)
    <root>/artifacts/       artifact root of every experiment, including "Default"

``mlflow_registry`` (session) trains once on 3,000 rows: ``churn-predictor`` v1 ``@champion``
(logistic regression), v2 ``@challenger`` (gradient boosting). ``fresh_registry()`` copies that
directory into the test's own ``tmp_path`` and rewrites the absolute paths stored in the database
(and in each ``MLmodel``) to the copy, so a test may move aliases, register new versions and write
artifacts without touching the session registry or other tests. Tests that only read may use
``mlflow_registry`` directly; tests that write anything must use ``fresh_registry``.

Servers: ``running_server(app)`` is a context manager running any ASGI app under a real
``uvicorn.Server`` (lifespan on) on 127.0.0.1 with an ephemeral port, yielding the base URL;
``running_router(settings)`` runs the router's app that way and yields a client once it is ready;
``fresh_router`` is one over a ``fresh_registry`` copy. ``router_dir`` gives router settings whose
prediction log is a SQLite file in ``tmp_path``.
"""

from __future__ import annotations

import os
import shutil
import socket
import sqlite3
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest
import uvicorn

# Third-party import-time warnings that ``filterwarnings = error`` would turn into collection
# errors for every module importing them, whoever imports first. Importing here, once, under a
# narrow filter keeps the suite's "error" policy for everything else:
# - mlflow.pyfunc builds an agent schema at import and warns "Any type hint is inferred as AnyType";
# - MLflow's SQLAlchemy store configures its mappers with the ``noload`` strategy SQLAlchemy 2.1
#   deprecates.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*Any type hint is inferred as AnyType")
    warnings.filterwarnings("ignore", message="The ``noload`` loader strategy is deprecated")
    import mlflow.pyfunc
    import mlflow.store.model_registry.sqlalchemy_store
    import mlflow.store.tracking.sqlalchemy_store

from demo.train import RegisteredPair, restored_tracking_uris, train_and_register
from router.changes import tracking_experiment_name
from router.config import Settings
from router.server.app import create_app
from router.splitrecord import SPLIT_TAG
from tests.live_router import RouterDir, http_client, wait_ready

MODEL_NAME = "churn-predictor"
SESSION_ROWS = 3_000


@dataclass(frozen=True)
class MlflowRegistry:
    """A local MLflow registry holding ``model_name`` v1 ``@champion`` and v2 ``@challenger``."""

    root: Path
    tracking_uri: str
    model_name: str
    versions: dict[str, str]  # alias -> version, as trained: {"champion": "1", "challenger": "2"}
    run_ids: dict[str, str]  # alias -> run id
    holdout_accuracy: dict[str, float]  # alias -> accuracy on ``holdout``
    holdout: pd.DataFrame = field(repr=False, compare=False)  # FEATURES + "churned"

    @property
    def artifact_root(self) -> Path:
        return self.root / "artifacts"

    @property
    def db_path(self) -> Path:
        return self.root / "mlflow.db"

    def uri_for(self, alias: str) -> str:
        """``models:/<name>@<alias>``."""
        return f"models:/{self.model_name}@{alias}"

    def client(self) -> mlflow.MlflowClient:
        return mlflow.MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)


def sqlite_uri(db_path: Path) -> str:
    return f"sqlite:///{db_path}"


def _rewrite_paths(db_path: Path, artifact_root: Path, old: str, new: str) -> None:
    """Replace the path prefix ``old`` by ``new`` in every text column and every MLmodel file."""
    conn = sqlite3.connect(db_path)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            for _cid, column, ctype, *_ in conn.execute(f'PRAGMA table_info("{table}")'):
                if any(t in str(ctype).upper() for t in ("CHAR", "TEXT", "CLOB")):
                    conn.execute(
                        f'UPDATE "{table}" SET "{column}" = REPLACE("{column}", ?, ?) '
                        f'WHERE INSTR("{column}", ?) > 0',
                        (old, new, old),
                    )
        conn.commit()
    finally:
        conn.close()
    for mlmodel in artifact_root.rglob("MLmodel"):
        text = mlmodel.read_text(encoding="utf-8")
        if old in text:
            mlmodel.write_text(text.replace(old, new), encoding="utf-8")


def copy_registry(source: MlflowRegistry, dest_root: Path) -> MlflowRegistry:
    """Copy ``source`` (database + artifacts) to ``dest_root`` and point the copy at itself."""
    dest_root.mkdir(parents=True, exist_ok=True)
    dest_db = dest_root / "mlflow.db"
    # The backup API gives a consistent snapshot even if the source has an open connection.
    src = sqlite3.connect(source.db_path)
    dst = sqlite3.connect(dest_db)
    try:
        src.backup(dst)
    finally:
        dst.close()
        src.close()
    shutil.copytree(source.artifact_root, dest_root / "artifacts")
    # Trailing separators: never rewrite a longer sibling path that merely shares the prefix.
    old_prefix, new_prefix = f"{source.root}{os.sep}", f"{dest_root}{os.sep}"
    _rewrite_paths(dest_db, dest_root / "artifacts", old_prefix, new_prefix)
    return MlflowRegistry(
        root=dest_root,
        tracking_uri=sqlite_uri(dest_db),
        model_name=source.model_name,
        versions=dict(source.versions),
        run_ids=dict(source.run_ids),
        holdout_accuracy=dict(source.holdout_accuracy),
        holdout=source.holdout.copy(),
    )


@pytest.fixture(autouse=True)
def _isolate_mlflow_globals() -> Iterator[None]:
    """No test leaks ``mlflow.set_tracking_uri`` or ``MLFLOW_TRACKING_URI`` into the next."""
    with restored_tracking_uris():
        yield


@pytest.fixture(scope="module", autouse=True)
def _no_module_leaks_mlflow_uris() -> Iterator[None]:
    """A module-scoped fixture outlives the per-test isolation above: its teardown must put the
    URIs back itself. Checked when the module ends, so a leak fails where it happens, not in some
    later test whose CLI reads the leaked ``MLFLOW_TRACKING_URI`` instead of its config."""
    keys = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    before = {k: os.environ.get(k) for k in keys}
    yield
    after = {k: os.environ.get(k) for k in keys}
    assert after == before, f"this module left {after} (was {before}): use restored_tracking_uris"


@pytest.fixture
def cli_workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """For tests running the CLI in process: none of the test's own environment picks its config
    or log, and MLflow writes new experiments' artifacts under ``tmp_path/mlruns``."""
    for key in ("MLFLOW_TRACKING_URI", "ROUTER_PREDICTION_LOG_URL", "ROUTER_CONFIG"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.chdir(tmp_path)
    yield


def _build_registry(root: Path) -> MlflowRegistry:
    root.mkdir(parents=True, exist_ok=True)
    tracking_uri = sqlite_uri(root / "mlflow.db")
    artifact_root = root / "artifacts"
    with restored_tracking_uris():
        pair: RegisteredPair = train_and_register(
            tracking_uri,
            MODEL_NAME,
            n_rows=SESSION_ROWS,
            seed=0,
            artifact_location=str(artifact_root / "training"),
        )
    # The "Default" experiment was created under MLflow's default root (``./mlruns`` of the
    # working directory); move it inside the registry so nothing a test logs lands in the repo.
    conn = sqlite3.connect(root / "mlflow.db")
    try:
        conn.execute(
            "UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
            (str(artifact_root / "0"),),
        )
        conn.commit()
    finally:
        conn.close()
    return MlflowRegistry(
        root=root,
        tracking_uri=tracking_uri,
        model_name=MODEL_NAME,
        versions={"champion": pair.champion.version, "challenger": pair.challenger.version},
        run_ids={"champion": pair.champion.run_id, "challenger": pair.challenger.run_id},
        holdout_accuracy={
            "champion": pair.champion.holdout_accuracy,
            "challenger": pair.challenger.holdout_accuracy,
        },
        holdout=pair.holdout,
    )


def _writes_to(registry: MlflowRegistry) -> list[str]:
    """What the router's own writes (a split of record, an audit run) left in ``registry``."""
    conn = sqlite3.connect(registry.root / "mlflow.db")
    try:
        tags = conn.execute(
            "SELECT name, version FROM model_version_tags WHERE key = ?", (SPLIT_TAG,)
        ).fetchall()
        audits = conn.execute(
            "SELECT name FROM experiments WHERE name = ?",
            (tracking_experiment_name(registry.model_name),),
        ).fetchall()
    finally:
        conn.close()
    return [f"split tag on {n} v{v}" for n, v in tags] + [f"experiment {n}" for (n,) in audits]


@pytest.fixture(scope="session")
def mlflow_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowRegistry]:
    """The session's registry (trained once, ~3 s). Read only: use ``fresh_registry`` to write.
    A write would leak into every later copy (a split of record, an audit experiment whose
    artifacts land in the working directory), so the session fails if one happened."""
    registry = _build_registry(tmp_path_factory.mktemp("mlflow-registry"))
    yield registry
    written = _writes_to(registry)
    assert not written, f"a test wrote to the read-only session registry: {written}"


FreshRegistry = Callable[[], MlflowRegistry]  # the type of the ``fresh_registry`` fixture


@pytest.fixture
def fresh_registry(mlflow_registry: MlflowRegistry, tmp_path: Path) -> FreshRegistry:
    """A factory of private copies of the session registry (each call: a new copy, ~50 ms)."""
    counter = iter(range(1_000_000))

    def make() -> MlflowRegistry:
        return copy_registry(mlflow_registry, tmp_path / f"registry-{next(counter)}")

    return make


@pytest.fixture
def chromium(tmp_path: Path) -> Iterator[Any]:
    """A headless Chromium on a blank page (``tests/chromium.py``'s ``DevTools``); skipped with a
    reason where none is installed (a failure in CI)."""
    from tests.chromium import headless_chromium

    with headless_chromium(tmp_path) as browser:
        yield browser


@pytest.fixture
def router_dir(tmp_path: Path) -> RouterDir:
    """Router settings for the test's ``tmp_path``: ``router_dir.settings(registry, routing=...)``
    log to ``tmp_path / "predictions.db"``, which ``router_dir.log_rows(sql)`` queries."""
    return RouterDir(tmp_path)


# --- servers ---------------------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (for subprocesses; in-process servers bind port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@contextmanager
def serve_in_thread(app: Any, *, startup_timeout_s: float = 60.0, **config: Any) -> Iterator[str]:
    """Run ``app`` under a real uvicorn server in a background thread; yield its base URL.

    The socket is bound before the server starts (no port race). Waits until the lifespan
    startup has completed; raises ``RuntimeError`` if the server stops before that (e.g. the
    lifespan failed) or ``TimeoutError``. On exit: graceful shutdown, lifespan shutdown included.
    Extra keyword arguments go to ``uvicorn.Config``.
    """
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted connections only when the
    # listening socket says it is TCP; without it keep-alive requests stall ~40 ms (Nagle).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = int(sock.getsockname()[1])
    settings: dict[str, Any] = {
        "lifespan": "on",
        "log_config": None,  # leave the process's logging configuration alone
        "log_level": "warning",
        "ws": "none",
        "access_log": False,
        "timeout_graceful_shutdown": 10,
    }
    settings.update(config)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, **settings))
    exit_codes: list[object] = []

    def run() -> None:
        try:
            server.run(sockets=[sock])
        except SystemExit as exc:  # uvicorn exits (code 3) when the lifespan startup fails
            exit_codes.append(exc.code)

    thread = threading.Thread(target=run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + startup_timeout_s
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError(
                    f"server on port {port} stopped during startup (exit code {exit_codes})"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"server on port {port} not started in {startup_timeout_s} s")
            time.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
        if thread.is_alive():
            # Not silently: a wedged shutdown is a bug in the app under test.
            server.force_exit = True
            thread.join(timeout=5)
            raise RuntimeError(f"server on port {port} did not shut down within 30 s")


RunningServer = Callable[..., AbstractContextManager[str]]  # the ``running_server`` fixture


@pytest.fixture
def running_server() -> RunningServer:
    """``with running_server(app) as base_url: ...``: see :func:`serve_in_thread`."""
    return serve_in_thread


@contextmanager
def serve_router(settings: Settings, **config: Any) -> Iterator[httpx.Client]:
    """``create_app(settings)`` under :func:`serve_in_thread` (``config`` goes to uvicorn); yield
    a client for it (:func:`~tests.live_router.http_client`) once ``/readyz`` answers 200."""
    with (
        serve_in_thread(create_app(settings), **config) as base_url,
        http_client(base_url) as client,
    ):
        wait_ready(client)
        yield client


# The ``running_router`` fixture's type.
RunningRouter = Callable[..., AbstractContextManager[httpx.Client]]


@pytest.fixture
def running_router() -> RunningRouter:
    """``with running_router(settings) as client: ...``: a ready router (:func:`serve_router`)."""
    return serve_router


@pytest.fixture
def router_routing() -> dict[str, Any]:
    """The ``routing`` settings of ``fresh_router``; a test module overrides this fixture to
    choose its own (its salt, say)."""
    return {}


@pytest.fixture
def fresh_router(
    fresh_registry: FreshRegistry,
    router_dir: RouterDir,
    running_router: RunningRouter,
    router_routing: dict[str, Any],
) -> Iterator[tuple[str, MlflowRegistry]]:
    """A ready router over a fresh registry, routing by ``router_routing``, logging in
    ``router_dir``: yields its base URL and the registry."""
    registry = fresh_registry()
    with running_router(router_dir.settings(registry, routing=router_routing)) as client:
        yield str(client.base_url), registry


SERVICE_MARKERS = ("postgres", "prometheus", "chromium")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """In CI (``ROUTER_REQUIRE_SERVICES=1``, set by .ci/run) a service test may not skip.

    Locally a missing PostgreSQL, Prometheus or Chromium skips with a reason; in CI, where
    .ci/run installs and starts them, the same skip would hide a broken set-up: it fails.
    """
    report = yield
    required = os.environ.get("ROUTER_REQUIRE_SERVICES") == "1"
    needs_service = any(item.get_closest_marker(m) for m in SERVICE_MARKERS)
    if required and needs_service and report.skipped:
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, where its service must be present: {report.longrepr}"
    return report
