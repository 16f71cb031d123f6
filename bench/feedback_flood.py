"""Does a flood of feedback for unknown ids delay scoring? ``python -m bench.feedback_flood``.

Trains the demo pair into a temporary registry and starts ``python -m router`` on it (a process of
its own, SQLite log). Phase 1 times N single-row ``/invocations`` one after another on one
keep-alive connection. Phase 2 sends ``--posts`` concurrent ``POST /feedback`` for request ids that
do not exist, each on its own connection, from a second process, and meanwhile times
``/invocations`` the same way until every post is answered. Prints the invocation latencies of
both phases, how the posts were answered (404, 503 with ``Retry-After``, anything else, no answer
within 60 s) and when the last of each arrived. Nothing here is a test: the figures depend on the
machine. Run it from another checkout's ``PYTHONPATH`` to time that checkout's router.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import yaml

from bench.hang import describe
from demo.data import FEATURES
from demo.train import train_and_register

MODEL = "feedback-flood"
ANSWER_TIMEOUT_S = 60.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start_router(root: Path, uri: str, port: int) -> subprocess.Popen[bytes]:
    config = {
        "model": {"name": MODEL, "tracking_uri": uri, "poll_interval_s": 3600},
        "routing": {"challenger_weight": 0.5},
        "prediction_log": {"url": f"sqlite:///{root / 'log.db'}"},
    }
    path = root / "router.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "ROUTER_"))}
    return subprocess.Popen(
        [sys.executable, "-m", "router", "--config", str(path), "--port", str(port)],
        cwd=root,
        env=env,
        stdout=(root / "router.out").open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _time_invocations(
    url: str, body: dict[str, Any], until: threading.Event | None, n: int
) -> list[float]:
    """Sequential single-row requests: ``n`` of them, or until ``until`` is set."""
    times: list[float] = []
    with httpx.Client(base_url=url, timeout=ANSWER_TIMEOUT_S) as client:
        while (until is None and len(times) < n) or (until is not None and not until.is_set()):
            start = time.perf_counter()
            response = client.post(
                "/invocations", json=body, headers={"X-Routing-Key": uuid.uuid4().hex}
            )
            times.append(time.perf_counter() - start)
            if response.status_code != 200:
                raise RuntimeError(f"/invocations answered {response.status_code}: {response.text}")
    return times


def _flood(url: str, posts: int, results: Any) -> None:
    """In a process of its own: ``posts`` concurrent feedback posts for unknown ids."""

    async def run() -> list[tuple[str, float]]:
        limits = httpx.Limits(max_connections=posts, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=url, timeout=ANSWER_TIMEOUT_S, limits=limits) as c:
            start = time.monotonic()

            async def one() -> tuple[str, float]:
                body = {"request_id": f"unknown-{uuid.uuid4().hex}", "outcome": 1}
                try:
                    response = await c.post("/feedback", json=body)
                except httpx.TimeoutException:
                    return "no answer", time.monotonic() - start
                except httpx.TransportError as exc:
                    return type(exc).__name__, time.monotonic() - start
                status = str(response.status_code)
                if response.status_code >= 500:
                    status += f" {response.json()['error']['message'][:150]}"
                if "retry-after" in response.headers:
                    status += " + Retry-After"
                return status, time.monotonic() - start

            return await asyncio.gather(*(one() for _ in range(posts)))

    results.extend(asyncio.run(run()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--posts", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=300, help="invocations in phase 1")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="feedback-flood-") as tmp:
        root = Path(tmp)
        uri = f"sqlite:///{root / 'mlflow.db'}"
        pair = train_and_register(
            uri, MODEL, n_rows=3000, seed=0, artifact_location=str(root / "artifacts")
        )
        row = pair.holdout[FEATURES].head(1)
        body = {"dataframe_split": {"columns": FEATURES, "data": row.to_numpy().tolist()}}
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        router = _start_router(root, uri, port)
        try:
            with httpx.Client(base_url=url, timeout=5) as client:
                deadline = time.monotonic() + 120
                while True:
                    try:
                        if client.get("/readyz").status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    if time.monotonic() > deadline or router.poll() is not None:
                        raise RuntimeError((root / "router.out").read_text()[-3000:])
                    time.sleep(0.2)
            _time_invocations(url, body, None, 50)  # warm-up
            before = _time_invocations(url, body, None, args.requests)
            with multiprocessing.Manager() as manager:
                results = manager.list()
                flood = multiprocessing.Process(target=_flood, args=(url, args.posts, results))
                done = threading.Event()
                flood.start()
                timer: list[float] = []
                thread = threading.Thread(
                    target=lambda: timer.extend(_time_invocations(url, body, done, 0))
                )
                thread.start()
                flood.join()
                done.set()
                thread.join()
                answers = list(results)
        finally:
            os.killpg(router.pid, signal.SIGTERM)
            try:
                router.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(router.pid, signal.SIGKILL)
                router.wait()
    print(describe("invocations, quiet", before, 36))
    print(describe(f"invocations, {args.posts} unknown-id posts", timer, 36))
    counts = collections.Counter(status for status, _ in answers)
    print(f"feedback answers: {dict(sorted(counts.items()))}")
    for status in sorted(counts):
        last = max(t for s, t in answers if s == status)
        print(f"  last {status:<18} after {last:6.2f} s")


if __name__ == "__main__":
    main()
