"""Drive a bounded load at one server from a second process: ``wrk`` if present, else Python.

Closed loop: each connection sends one single-row ``POST /invocations`` at a time. With routing
keys, every request carries ``X-Routing-Key: user-N`` cycling over ``users`` ids.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

WRK_RESULT_MARK = "BENCH_JSON "
# wrk and the Python generator get this much time beyond the run before they count as hung.
GRACE_S = 30.0

# One Lua state per wrk thread; ``request`` builds each request so the routing key can vary.
# Latencies from wrk are microseconds.
_WRK_LUA = """
local body = [==[{body}]==]
local users = {users}
local with_keys = {with_keys}
local counter = 0
local headers = {{["Content-Type"] = "application/json"}}

request = function()
  counter = counter + 1
  if with_keys then
    headers["X-Routing-Key"] = "user-" .. (counter % users)
  end
  return wrk.format("POST", "/invocations", headers, body)
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{mark}{{"requests": %d, "duration_us": %d, "errors": %d, "p50_us": %f, "p99_us": %f}}\\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


@dataclass(frozen=True)
class LoadSpec:
    """What one measurement sends."""

    port: int
    body: str  # the JSON request body
    connections: int
    duration_s: float
    routing_keys: bool = False
    users: int = 10_000
    host: str = "127.0.0.1"


@dataclass(frozen=True)
class LoadResult:
    """One measurement: throughput and latency percentiles (milliseconds)."""

    generator: str
    connections: int
    requests: int
    duration_s: float
    errors: int
    p50_ms: float
    p99_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else math.nan


def wrk_path() -> str | None:
    return shutil.which("wrk")


def wrk_version() -> str | None:
    path = wrk_path()
    if path is None:
        return None
    out = subprocess.run([path, "-v"], capture_output=True, text=True, timeout=10, check=False)
    match = re.search(r"wrk\s+(\S+)", out.stdout + out.stderr)
    return match.group(1) if match else "unknown"


def generator_name(prefer_wrk: bool = True) -> str:
    """``"wrk"`` when it is installed (and preferred), else ``"python"``."""
    return "wrk" if prefer_wrk and wrk_path() is not None else "python"


def run_load(spec: LoadSpec, generator: str) -> LoadResult:
    """One bounded run with ``generator`` (``"wrk"`` or ``"python"``)."""
    if generator == "wrk":
        return _run_wrk(spec)
    if generator == "python":
        return _run_python(spec)
    raise ValueError(f"unknown load generator {generator!r}")


def measure(spec: LoadSpec, generator: str, warmup_s: float) -> LoadResult:
    """Warm the target up for ``warmup_s`` (discarded), then measure ``spec``."""
    if warmup_s > 0:
        run_load(_with_duration(spec, warmup_s), generator)
    return run_load(spec, generator)


def _with_duration(spec: LoadSpec, duration_s: float) -> LoadSpec:
    return LoadSpec(
        port=spec.port,
        body=spec.body,
        connections=spec.connections,
        duration_s=duration_s,
        routing_keys=spec.routing_keys,
        users=spec.users,
        host=spec.host,
    )


def _run_wrk(spec: LoadSpec) -> LoadResult:
    path = wrk_path()
    if path is None:
        raise RuntimeError("wrk is not installed")
    if "]==]" in spec.body:
        raise ValueError("request body cannot be embedded in the Lua script")
    script = _WRK_LUA.format(
        body=spec.body,
        users=spec.users,
        with_keys="true" if spec.routing_keys else "false",
        mark=WRK_RESULT_MARK,
    )
    with tempfile.TemporaryDirectory(prefix="bench-wrk-") as tmp:
        lua = Path(tmp) / "post.lua"
        lua.write_text(script, encoding="utf-8")
        # One wrk thread: on a small machine a second one only takes CPU from the server.
        cmd = [
            path,
            "-t1",
            f"-c{spec.connections}",
            f"-d{max(1, round(spec.duration_s))}s",
            "--timeout",
            "10s",
            "-s",
            str(lua),
            f"http://{spec.host}:{spec.port}/invocations",
        ]
        out = subprocess.run(
            cmd, capture_output=True, text=True, timeout=spec.duration_s + GRACE_S, check=False
        )
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith(WRK_RESULT_MARK)), None)
    if out.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed (exit {out.returncode}): {out.stderr.strip()[-500:]}")
    data = json.loads(line[len(WRK_RESULT_MARK) :])
    return LoadResult(
        generator="wrk",
        connections=spec.connections,
        requests=int(data["requests"]),
        duration_s=data["duration_us"] / 1e6,
        errors=int(data["errors"]),
        p50_ms=data["p50_us"] / 1e3,
        p99_ms=data["p99_us"] / 1e3,
    )


def _run_python(spec: LoadSpec) -> LoadResult:
    payload = json.dumps(
        {
            "host": spec.host,
            "port": spec.port,
            "path": "/invocations",
            "body": spec.body,
            "connections": spec.connections,
            "duration_s": spec.duration_s,
            "routing_keys": spec.routing_keys,
            "users": spec.users,
        }
    )
    out = subprocess.run(
        [sys.executable, "-m", "bench.pyload", payload],
        capture_output=True,
        text=True,
        timeout=spec.duration_s + GRACE_S,
        check=False,
        cwd=Path(__file__).resolve().parent.parent,
    )
    if out.returncode != 0 or not out.stdout.strip():
        raise RuntimeError(
            f"python load generator failed (exit {out.returncode}): {out.stderr.strip()[-500:]}"
        )
    data = json.loads(out.stdout.strip().splitlines()[-1])
    return LoadResult(
        generator="python",
        connections=spec.connections,
        requests=int(data["requests"]),
        duration_s=float(data["duration_s"]),
        errors=int(data["errors"]),
        p50_ms=float(data["p50_ms"]),
        p99_ms=float(data["p99_ms"]),
    )
