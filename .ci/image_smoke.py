"""Smoke-test a built router image from outside, with podman (called by .ci/image.sh).

python3 .ci/image_smoke.py IMAGE BASE_IMAGE

1. Trains the project's two demo models into a registry on a mounted data directory, inside the
   image, without network.
2. Runs the image's own CMD as it would run in Kubernetes (read-only root, /tmp a tmpfs, all
   capabilities dropped) with a mounted config, published on 127.0.0.1 only.
3. Checks /readyz, POST /invocations answered by both arms (sticky routing keys at a 50/50
   split) with matching X-Arm / X-Model-Version / X-Request-Id headers, /metrics,
   `podman healthcheck run`, the process uid seen from the host, and that nothing of the build
   (pip.conf, the host's CA bundle) stayed in the image.
4. `podman stop` within the grace period, exit status 0, and every row served is in the
   prediction log read from the mounted database.

Standard library only: it runs on the host's python3 before any virtualenv exists. Every
container it starts is removed at the end, whatever happens.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from email.message import Message
from pathlib import Path
from typing import Any

UID = 10001  # the Dockerfile's USER
GRACE_S = 45  # deploy/docker-compose.yml stop_grace_period
READY_TIMEOUT_S = 180
MODEL = "churn-predictor"
VERSIONS = {"champion": "1", "challenger": "2"}  # train_and_register on an empty registry
REQUESTS = 40  # distinct routing keys; at a 50/50 split both arms get some (deterministic hash)
ROWS_PER_REQUEST = 3
LABEL = "champion-challenger.image-smoke"  # on every container started here, for the clean-up

CONFIG = f"""\
model:
  name: {MODEL}
  tracking_uri: sqlite:////data/mlflow.db
  poll_interval_s: 10
routing:
  mode: split
  challenger_weight: 0.5
  salt: image-smoke
prediction_log:                # nothing is written before shutdown: the stop must flush it all
  url: sqlite:////data/predictions.db
  batch_size: 100000
  flush_interval_s: 3600
server:
  host: 0.0.0.0
  port: 8000
  workers: 1
"""

TRAIN = f"""\
import json
from demo.data import FEATURES, make_churn_data
from demo.train import main
main(["--tracking-uri", "sqlite:////data/mlflow.db", "--name", "{MODEL}", "--rows", "4000"])
rows = make_churn_data({ROWS_PER_REQUEST}, 7)[FEATURES].to_dict(orient="records")
open("/data/body.json", "w").write(json.dumps({{"dataframe_records": rows}}))
"""


def podman(
    *args: str, check: bool = True, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["podman", *args], capture_output=True, text=True, check=check, timeout=timeout
    )


def say(message: str) -> None:
    print(f"image-smoke: {message}", flush=True)


def fail(message: str) -> None:
    raise SystemExit(f"image-smoke: FAILED: {message}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http(
    method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, Message, bytes]:
    """(status, headers (case-insensitive), body)."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


def wait_ready(base: str, container: str) -> float:
    started = time.monotonic()
    while time.monotonic() - started < READY_TIMEOUT_S:
        state = podman("inspect", "--format", "{{.State.Status}}", container).stdout.strip()
        if state != "running":
            fail(f"container {state} before ready:\n{podman('logs', container).stderr}")
        try:
            status, _, _ = http("GET", f"{base}/readyz")
        except OSError:
            status = 0
        if status == 200:
            return time.monotonic() - started
        time.sleep(1)
    fail(f"/readyz not 200 after {READY_TIMEOUT_S} s")
    raise AssertionError("unreachable")


def check_build_left_nothing(image: str, base_image: str) -> None:
    """The build mounted the host's CA bundle; the image keeps the base's, and no pip.conf."""
    probe = (
        "sha256sum /etc/ssl/certs/ca-certificates.crt; "
        "for p in /etc/pip.conf /root/.cache /src /tmp/deps; do test -e $p && echo left:$p; done"
    )
    cmd = ("run", "--rm", "--label", LABEL, "--network", "none", "--no-healthcheck", "--user", "0")
    in_image = podman(*cmd, image, "sh", "-c", probe, check=False).stdout
    in_base = podman(*cmd, base_image, "sh", "-c", probe, check=False).stdout
    if in_image.split()[0] != in_base.split()[0]:
        fail("the image's CA bundle is not the base image's (a build mount stayed)")
    if "left:" in in_image:
        fail(f"build leftovers in the image: {in_image}")
    say("the build left no pip.conf, pip cache, sources or host CA bundle in the image")


def train(image: str, data: Path) -> None:
    started = time.monotonic()
    out = podman(
        "run", "--rm", "--label", LABEL, "--network", "none", "--no-healthcheck",
        "-v", f"{data}:/data", "-e", "HOME=/tmp", image, "python", "-c", TRAIN,
    ).stdout  # fmt: skip
    say(f"registry trained inside the image, no network ({time.monotonic() - started:.0f} s)")
    for line in out.strip().splitlines():
        say(f"  {line}")


def invoke_both_arms(base: str, body: bytes) -> dict[str, int]:
    """Rows served per arm; every response's headers agree with its body and the registry."""
    served: dict[str, int] = {}
    for i in range(REQUESTS):
        status, headers, raw = http(
            "POST",
            f"{base}/invocations",
            body,
            {"Content-Type": "application/json", "X-Routing-Key": f"customer-{i}"},
        )
        if status != 200:
            fail(f"/invocations answered {status}: {raw[:300]!r}")
        answer: dict[str, Any] = json.loads(raw)
        arm = answer["arm"]
        if headers.get("X-Arm") != arm or arm not in VERSIONS:
            fail(f"X-Arm {headers.get('X-Arm')!r} vs body arm {arm!r}")
        version = answer["model_version"]
        if version != VERSIONS[arm] or headers.get("X-Model-Version") != version:
            fail(f"{arm}: version {version!r}, X-Model-Version {headers.get('X-Model-Version')!r}")
        if headers.get("X-Request-Id") != answer["request_id"]:
            fail("X-Request-Id differs from the body's request_id")
        if len(answer["predictions"]) != ROWS_PER_REQUEST:
            fail(f"{len(answer['predictions'])} predictions for {ROWS_PER_REQUEST} rows")
        served[arm] = served.get(arm, 0) + ROWS_PER_REQUEST
    if set(served) != set(VERSIONS):
        fail(f"only {sorted(served)} answered {REQUESTS} routing keys")
    return served


def check_metrics(base: str, rows_served: int) -> None:
    status, _, raw = http("GET", f"{base}/metrics")
    text = raw.decode()
    if status != 200:
        fail(f"/metrics answered {status}")
    for arm, version in VERSIONS.items():
        series = f'router_requests_total{{arm="{arm}",model_version="{version}",status="ok"}}'
        if series not in text:
            fail(f"/metrics lacks {series}")
    if "router_ready 1.0" not in text:
        fail("/metrics: router_ready is not 1")
    pending = f"router_prediction_log_pending {float(rows_served)}"
    if pending not in text:
        fail(f"/metrics lacks {pending!r}: the log was written before the stop")
    say(f"/metrics 200: requests of both arms, router_ready 1, {rows_served} log rows pending")


def check_uid(container: str) -> None:
    pid = podman("inspect", "--format", "{{.State.Pid}}", container).stdout.strip()
    status = Path(f"/proc/{pid}/status").read_text()
    uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
    if "0" in uids or uids[0] != str(UID):
        fail(f"process {pid} runs with uids {uids}")
    say(f"process {pid} runs as uid {uids[0]} (seen from the host)")


def check_healthcheck(container: str) -> None:
    result = podman("healthcheck", "run", container, check=False)
    if result.returncode != 0:
        fail(f"podman healthcheck run: {result.returncode} {result.stdout}{result.stderr}")
    say(f"podman healthcheck run: {(result.stdout.strip() or 'healthy')}")


def stop_and_count(container: str, data: Path, served: dict[str, int]) -> None:
    started = time.monotonic()
    result = podman("stop", "--time", str(GRACE_S), container, check=False, timeout=GRACE_S + 30)
    elapsed = time.monotonic() - started
    exit_code = podman("inspect", "--format", "{{.State.ExitCode}}", container).stdout.strip()
    if result.returncode != 0 or exit_code != "0" or elapsed >= GRACE_S:
        fail(f"podman stop rc {result.returncode}, exit {exit_code}, {elapsed:.1f} s")
    say(f"podman stop: exit status 0 after {elapsed:.1f} s (grace {GRACE_S} s)")
    with sqlite3.connect(data / "predictions.db") as db:
        logged = dict(db.execute("SELECT arm, COUNT(*) FROM predictions GROUP BY arm").fetchall())
    if logged != served:
        fail(f"rows served {served} != rows in the prediction log {logged}")
    say(f"prediction log after stop: {logged} = rows served")


def remove_leftovers() -> None:
    """Containers of an earlier run that was killed before its own clean-up (label LABEL only)."""
    found = podman("ps", "--all", "--quiet", "--filter", f"label={LABEL}").stdout.split()
    if found:
        podman("rm", "--force", "--time", "0", *found, check=False)
        say(f"removed {len(found)} container(s) left by an earlier run")


def main(image: str, base_image: str) -> None:
    started = time.monotonic()
    # A CI time-out or ^C ends the run through the clean-up below, not around it.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    remove_leftovers()
    work = Path(tempfile.mkdtemp(prefix="image-smoke-"))
    data = work / "data"
    data.mkdir()
    os.chown(data, UID, UID)  # the image's user writes the registry and the log here
    (work / "config.yaml").write_text(CONFIG)
    container = f"image-smoke-{os.getpid()}"
    try:
        check_build_left_nothing(image, base_image)
        train(image, data)
        port = free_port()
        podman(
            "run", "--detach", "--name", container, "--label", LABEL,
            "--publish", f"127.0.0.1:{port}:8000",
            "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL",
            "--security-opt", "no-new-privileges", "-e", "HOME=/tmp",
            "-v", f"{work / 'config.yaml'}:/app/config.yaml:ro", "-v", f"{data}:/data",
            image,
        )  # fmt: skip
        base = f"http://127.0.0.1:{port}"
        say(f"/readyz 200 after {wait_ready(base, container):.1f} s ({base})")
        served = invoke_both_arms(base, (data / "body.json").read_bytes())
        say(f"POST /invocations x{REQUESTS}: rows served per arm {served}, headers match")
        check_metrics(base, sum(served.values()))
        check_healthcheck(container)
        check_uid(container)
        stop_and_count(container, data, served)
        logs = podman("logs", container).stderr.strip().splitlines()
        say("last log lines: " + " | ".join(line[-80:] for line in logs[-2:]))
    except subprocess.CalledProcessError as exc:
        fail(f"{' '.join(exc.cmd[:4])}...: exit {exc.returncode}\n{exc.stdout}{exc.stderr}")
    finally:
        if podman("container", "exists", container, check=False).returncode == 0:
            if sys.exc_info()[0] is not None:
                print(podman("logs", container, check=False).stderr[-3000:], file=sys.stderr)
            podman("rm", "--force", "--time", "0", container, check=False)
        shutil.rmtree(work, ignore_errors=True)
    size = int(podman("image", "inspect", "--format", "{{.Size}}", image).stdout)
    say(f"image {image}: {size / 1e6:.0f} MB; smoke test {time.monotonic() - started:.0f} s; OK")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2])
