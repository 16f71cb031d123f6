"""Champion latency while the challenger hangs: ``python -m bench.hang [--requests N]``.

One router (real uvicorn on 127.0.0.1, in this process) serves the demo champion and a challenger
whose ``predict`` blocks until this script lets it go. Phase 1 times N single-row champion
requests (sticky keys that hash to the champion) one after another on one keep-alive connection;
phase 2 first sends 3 x ``server.predict_threads`` challenger requests that all block (every
challenger thread hung, the rest waiting for one), then times N champion requests the same way;
then the challenger is released. Prints p50 / p99 / max of both phases. Nothing here is a test:
the figures depend on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import uvicorn
from mlflow import pyfunc
from mlflow.pyfunc.model import PythonModel
from mlflow.tracking import MlflowClient

from demo.data import FEATURES
from demo.train import (
    PIP_REQUIREMENTS,
    label_version,
    signature_for,
    train_and_register,
    using_tracking_uri,
)
from router.assignment import bucket_of, threshold_of
from router.config import settings_from_mapping
from router.server.app import create_app

MODEL = "hang-bench"
SALT = "hang-bench"


class GatedModel(PythonModel):
    """Blocks every predict until ``<gate>/release`` exists (bounded at 10 minutes)."""

    def __init__(self, gate: str) -> None:
        self.gate = gate

    def predict(self, context: Any, model_input: pd.DataFrame, params: Any = None) -> np.ndarray:
        release = Path(self.gate) / "release"
        deadline = time.monotonic() + 600
        while not release.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        return np.tile([0.5, 0.5], (len(model_input), 1))


def _keys(arm: str, n: int) -> list[str]:
    threshold = threshold_of(0.5)
    keys = (f"user-{i}" for i in range(1_000_000))
    chosen = (k for k in keys if (bucket_of(SALT, k) < threshold) == (arm == "challenger"))
    return [next(chosen) for _ in range(n)]


def _register(root: Path) -> tuple[str, pd.DataFrame]:
    uri = f"sqlite:///{root / 'mlflow.db'}"
    pair = train_and_register(
        uri, MODEL, n_rows=3000, seed=0, artifact_location=str(root / "artifacts")
    )
    example = pair.holdout[FEATURES].head(5)
    with using_tracking_uri(uri):
        info = pyfunc.log_model(
            name="model",
            python_model=GatedModel(str(root)),
            signature=signature_for(example),
            registered_model_name=MODEL,
            pip_requirements=PIP_REQUIREMENTS,
        )
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    label_version(client, MODEL, str(info.registered_model_version), alias="challenger")
    return uri, pair.holdout


def _time(client: httpx.Client, body: dict[str, Any], keys: list[str]) -> list[float]:
    times = []
    for key in keys:
        start = time.perf_counter()
        response = client.post("/invocations", json=body, headers={"X-Routing-Key": key})
        times.append(time.perf_counter() - start)
        assert response.status_code == 200 and response.json()["arm"] == "champion", response.text
    return times


def describe(name: str, times: list[float], width: int = 32) -> str:
    """One line: ``name``, then p50 / p99 / max of ``times`` (seconds) in ms, and n."""
    ordered = sorted(times)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return (
        f"{name:<{width}} p50 {statistics.median(ordered) * 1e3:7.2f} ms   "
        f"p99 {p99 * 1e3:7.2f} ms   max {ordered[-1] * 1e3:7.2f} ms   (n={len(ordered)})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--threads", type=int, default=4, help="server.predict_threads")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hang-bench-") as tmp:
        root = Path(tmp)
        uri, holdout = _register(root)
        settings = settings_from_mapping(
            {
                "model": {"name": MODEL, "tracking_uri": uri, "poll_interval_s": 3600},
                "routing": {"challenger_weight": 0.5, "salt": SALT},
                "prediction_log": {"url": f"sqlite:///{root / 'log.db'}"},
                "server": {"predict_threads": args.threads, "challenger_timeout_s": None},
            },
            env={},
        )
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        config = uvicorn.Config(
            create_app(settings), log_level="warning", access_log=False, lifespan="on"
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        frame = holdout[FEATURES].head(1)
        body = {"dataframe_split": {"columns": FEATURES, "data": frame.to_numpy().tolist()}}
        champion_keys = _keys("champion", 2 * args.requests)
        # TCP_NODELAY: httpx writes headers and body apart; with Nagle each request would wait
        # for the server's delayed ACK (~40 ms) and that is all one would measure.
        nodelay = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
        transport = httpx.HTTPTransport(socket_options=nodelay)
        with httpx.Client(base_url=url, timeout=600, transport=transport) as client:
            while True:
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
            _time(client, body, champion_keys[:50])  # warm-up
            before = _time(client, body, champion_keys[: args.requests])
            hung_keys = _keys("challenger", 3 * args.threads)
            hung = threading.Thread(target=_hang, args=(url, body, hung_keys), daemon=True)
            hung.start()
            while not any(t.name.startswith("predict-challenger") for t in threading.enumerate()):
                time.sleep(0.01)
            during = _time(client, body, champion_keys[args.requests :])
            still_hung = hung.is_alive()
            (root / "release").touch()
            hung.join(timeout=600)
        server.should_exit = True
        thread.join(timeout=30)
    print(describe("champion, challenger idle", before))
    print(describe("champion, challenger hung", during))
    print(f"challenger requests still blocked after phase 2: {still_hung}")


def _hang(url: str, body: dict[str, Any], keys: list[str]) -> None:
    async def fire() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=600) as client:
            posts = [
                client.post("/invocations", json=body, headers={"X-Routing-Key": key})
                for key in keys
            ]
            await asyncio.gather(*posts)

    asyncio.run(fire())


if __name__ == "__main__":
    main()
