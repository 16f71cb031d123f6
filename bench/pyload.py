"""A Python load generator, used when ``wrk`` is absent: ``python -m bench.pyload SPEC_JSON``.

Runs in its own process (never the server's): ``connections`` keep-alive HTTP/1.1 connections on
raw asyncio streams, each sending one request at a time until the deadline (closed loop, as wrk).
Prints one JSON line with the count, the duration and latency percentiles.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any

READ_LIMIT = 1 << 20


@dataclass
class _Tally:
    latencies_s: list[float] = field(default_factory=list)
    errors: int = 0  # non-2xx statuses and broken connections


def _request_bytes(host: str, port: int, path: str, body: bytes, key: str | None) -> bytes:
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
    ]
    if key is not None:
        lines.append(f"X-Routing-Key: {key}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + body


async def _read_response(reader: asyncio.StreamReader) -> int:
    """Read one response; return its status. Needs Content-Length (every target sends it)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, _, rest = head.partition(b"\r\n")
    status = int(status_line.split(b" ", 2)[1])
    length = None
    for line in rest.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    if length is None:
        raise ValueError("response without Content-Length")
    await reader.readexactly(length)
    return status


async def _connection(
    spec: dict[str, Any], index: int, deadline: float, tally: _Tally, record: bool
) -> None:
    host, port, path = spec["host"], int(spec["port"]), spec["path"]
    body = spec["body"].encode()
    users = int(spec["users"])
    with_keys = bool(spec["routing_keys"])
    reader, writer = await asyncio.open_connection(host, port, limit=READ_LIMIT)
    n = index
    try:
        while time.perf_counter() < deadline:
            key = f"user-{n % users}" if with_keys else None
            n += int(spec["connections"])
            request = _request_bytes(host, port, path, body, key)
            start = time.perf_counter()
            writer.write(request)
            try:
                status = await _read_response(reader)
            except (asyncio.IncompleteReadError, ConnectionError, ValueError):
                tally.errors += 1
                return
            elapsed = time.perf_counter() - start
            if record:
                tally.latencies_s.append(elapsed)
                if not 200 <= status < 300:
                    tally.errors += 1
    finally:
        writer.close()
        await asyncio.gather(writer.wait_closed(), return_exceptions=True)


async def _run(spec: dict[str, Any]) -> dict[str, Any]:
    tally = _Tally()
    start = time.perf_counter()
    deadline = start + float(spec["duration_s"])
    await asyncio.gather(
        *(_connection(spec, i, deadline, tally, True) for i in range(int(spec["connections"])))
    )
    elapsed = time.perf_counter() - start
    lat = sorted(tally.latencies_s)
    return {
        "requests": len(lat),
        "duration_s": elapsed,
        "errors": tally.errors,
        "p50_ms": _percentile(lat, 50) * 1e3,
        "p99_ms": _percentile(lat, 99) * 1e3,
    }


def _percentile(sorted_values: list[float], pct: float) -> float:
    """Nearest-rank percentile of an ascending list (NaN when empty)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, round(pct / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def main(argv: list[str]) -> int:
    spec: dict[str, Any] = json.loads(argv[0])
    print(json.dumps(asyncio.run(_run(spec))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
