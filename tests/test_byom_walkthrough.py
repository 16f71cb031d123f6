"""``docs/byom.md`` run as written: a real ``mlflow server``, a model that is not the demo's
(diabetes: random forest vs gradient boosting), ``cc-router --workers 2``, sticky requests with
feedback, a first evaluation and the scheduled run.

The document marks each block it means to be run with an HTML comment before it:
``<!-- walkthrough: file NAME -->`` (written to NAME), ``env`` (its ``export`` lines),
``run`` (``bash -e``; must exit 0) and ``background ready=PATH`` (a server, ready once PATH
answers 200, stopped at the end). This test executes them in order, in a temporary directory,
with the document's ports 5000 (MLflow) and 8000 (router) replaced by free ones; then it checks
what the steps produced. The add-signature script is run on a version logged without one.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import mlflow
from conftest import free_port
from mlflow_server import server_process
from router_process import REPO_ROOT, clean_env

DOC = REPO_ROOT / "docs" / "byom.md"
MODEL = "diabetes-progression"
REQUESTS = 300
PATIENTS = 60
BLOCK = re.compile(
    r"<!-- walkthrough: (?P<kind>\w+)(?: (?P<arg>[^>]*?))? -->\n```\w*\n(?P<text>.*?)```",
    re.DOTALL,
)
# The document's steps, in order: a step dropped or reordered must show up here.
STEPS = [
    ("background", "ready=/health"),
    ("env", ""),
    ("file", "register.py"),
    ("run", ""),
    ("file", "inspect_model.py"),
    ("run", ""),
    ("file", "add_signature.py"),
    ("file", "byom.yaml"),
    ("background", "ready=/readyz"),
    ("run", ""),
    ("file", "client.py"),
    ("run", ""),
    ("run", ""),
    ("file", "evaluate.sh"),
    ("run", ""),
]


@dataclass(frozen=True)
class Block:
    kind: str
    arg: str
    text: str


def _blocks(ports: dict[str, str]) -> list[Block]:
    doc = DOC.read_text(encoding="utf-8")
    blocks = []
    for match in BLOCK.finditer(doc):
        text = match["text"]
        for old, new in ports.items():
            text = text.replace(old, new)
        blocks.append(Block(match["kind"], match["arg"] or "", text))
    return blocks


def _bash(script: str, cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(
        ["bash", "-e", "-c", script],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, f"{script}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    return done.stdout


def test_the_walkthrough_runs_as_written(tmp_path: Path) -> None:
    mlflow_port, router_port = str(free_port()), str(free_port())
    blocks = _blocks({"5000": mlflow_port, "8000": router_port})
    assert [(b.kind, b.arg) for b in blocks] == STEPS
    env = clean_env({"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"})
    # The machine's load, not the document's: nothing here uses the MLflow server's GenAI job
    # runner (seven huey worker processes).
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    outputs: list[str] = []
    with ExitStack() as servers:
        for block in blocks:
            if block.kind == "file":
                (tmp_path / block.arg).write_text(block.text, encoding="utf-8")
            elif block.kind == "env":
                for name, value in re.findall(r"^export (\w+)=(\S+)$", block.text, re.MULTILINE):
                    env[name] = value
            elif block.kind == "background":
                name = "mlflow" if block.arg == "ready=/health" else "router"
                port = mlflow_port if name == "mlflow" else router_port
                command = ["bash", "-c", f"exec {block.text}"]
                ready = block.arg.removeprefix("ready=")
                servers.enter_context(
                    server_process(
                        command, int(port), tmp_path, ready_path=ready, env=env, name=name
                    )
                )
            else:
                outputs.append(_bash(block.text, tmp_path, env))
        registered, inspected, looked, replayed, evaluated, scheduled = outputs

        # Step 1-2: two versions with signatures, behind the two aliases.
        assert "@champion = v1 (RandomForestRegressor)" in registered
        assert "@challenger = v2 (GradientBoostingRegressor)" in registered
        assert "aliases: {'challenger': '2', 'champion': '1'}" in inspected
        assert "v1: python_function, sklearn; signature" in inspected
        # Step 6: ready, both arms served.
        assert '"status":"ready"' in looked and '"arm":"challenger"' in looked
        # Step 7: every request answered, each patient in one arm only, every outcome stored.
        served = json.loads(replayed.replace("'", '"'))
        assert set(served) == {"champion", "challenger"} and sum(served.values()) == REQUESTS
        with sqlite3.connect(tmp_path / "predictions.db") as log:
            arms_per_patient = log.execute(
                "SELECT routing_key_hash IS NULL, COUNT(DISTINCT arm) FROM predictions "
                "GROUP BY routing_key_hash"
            ).fetchall()
            (outcomes,) = log.execute("SELECT COUNT(*) FROM outcomes").fetchone()
        assert sorted(arms_per_patient) == [(0, 1)] * PATIENTS
        assert outcomes == REQUESTS
        # Step 8: every row judged on its squared error; too few yet to decide.
        assert "exit code 4" in evaluated
        evaluation = json.loads((tmp_path / "evaluation.json").read_text(encoding="utf-8"))
        assert evaluation["exit_code"] == 4 and evaluation["decision"] == "inconclusive"
        assert evaluation["metric"] == "squared_error" and evaluation["unit"].startswith("user")
        assert evaluation["champion"]["n"] + evaluation["challenger"]["n"] == REQUESTS
        assert (tmp_path / "report.html").is_file()
        # Step 9: the scheduled run recorded its evaluation in MLflow and counted as success.
        assert "scheduled run: ok" in scheduled
        client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"], env["MLFLOW_TRACKING_URI"])
        audit = client.get_experiment_by_name(f"champion-challenger/{MODEL}")
        assert audit is not None
        (run,) = client.search_runs([audit.experiment_id])
        assert run.data.tags["champion_challenger.action"] == "kept"

        # Step 3 on a version logged without a signature: the script gives it one.
        unsigned = _log_without_signature(tmp_path, env)
        inspected = _bash(f"python inspect_model.py {MODEL}", tmp_path, env)
        assert f"v{unsigned}: python_function, sklearn; NO SIGNATURE" in inspected
        added = _bash(f"python add_signature.py {MODEL} {unsigned}", tmp_path, env)
        signed = int(unsigned) + 1
        assert f"v{signed} = v{unsigned} with a signature" in added
        inspected = _bash(f"python inspect_model.py {MODEL}", tmp_path, env)
        assert f"v{signed}: python_function, sklearn; signature" in inspected
    router_output = (tmp_path / f"router-{router_port}.out").read_text(encoding="utf-8")
    assert router_output.count("Application startup complete.") == 2  # --workers 2


def _log_without_signature(workdir: Path, env: dict[str, str]) -> str:
    """A version as an existing registry may hold one: logged without a signature."""
    script = f"""
import mlflow, mlflow.sklearn
model = mlflow.sklearn.load_model("models:/{MODEL}/1")
with mlflow.start_run():
    info = mlflow.sklearn.log_model(model, name="model", registered_model_name="{MODEL}",
                                    skops_trusted_types=["sklearn.tree._tree.Tree"],
                                    pip_requirements=["scikit-learn"])
print(info.registered_model_version)
"""
    return _bash(f"python - <<'EOF'\n{script}\nEOF", workdir, env).strip().splitlines()[-1]
