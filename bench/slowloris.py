"""Do slow clients lock others out? ``python -m bench.slowloris URL [--connections N]``.

Opens N connections to a running router, each sending a request head one header line per second and
never its end (slowloris), while a probe opens a fresh connection every 0.2 s for ``GET /healthz``.
Prints how the slow connections ended (the router's 408 at ``limits.header_read_timeout_s``, its 503
when displaced at ``limits.max_connections``, or still open) and what the probes got; with
``--pid`` also the most file descriptors that process had open (sampled every 0.5 s). With
``--served`` each slow connection first completes one request (keep-alive) and then trickles its
next head: a connection served once must not hold its slot for ever (issue 20, item 5).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import time
from collections.abc import Sequence
from urllib.parse import urlsplit

LINE_INTERVAL_S = 1.0
PROBE_INTERVAL_S = 0.2
PROBE_TIMEOUT_S = 5.0
OPEN_BATCH = 100  # connections opened at once, then a short pause


async def _slow_client(
    host: str, port: int, seconds: float, seen: collections.Counter[str], served: bool
) -> None:
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError as exc:
        seen[f"connect failed: {type(exc).__name__}"] += 1
        return
    if served:
        status = await _one_request(reader, writer)
        if status != "HTTP/1.1 200":
            seen[f"first request: {status}"] += 1
            writer.close()
            return
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            try:
                answer = await asyncio.wait_for(reader.read(64), LINE_INTERVAL_S)
            except TimeoutError:
                writer.write(b"X-Slow: 1\r\n")
                continue
            seen[answer[:12].decode("ascii", "replace") or "closed, no answer"] += 1
            return
        seen["still open at the end"] += 1
    except OSError:
        seen["reset"] += 1
    finally:
        writer.close()


async def _one_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> str:
    """One keep-alive ``GET /healthz``, its whole answer read; its status line's start."""
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            (
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            ),
            0,
        )
        await reader.readexactly(length)
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        return "closed"
    return head[:12].decode("ascii", "replace")


async def _probe(host: str, port: int, seconds: float, got: collections.Counter[str]) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        await asyncio.sleep(PROBE_INTERVAL_S)
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_S):
                reader, writer = await asyncio.open_connection(host, port)
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                answer = await reader.read()
                writer.close()
            got[answer[:12].decode("ascii", "replace") or "closed, no answer"] += 1
        except (OSError, TimeoutError) as exc:
            got[type(exc).__name__] += 1


async def _peak_fds(pid: int, seconds: float) -> int:
    peak = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        peak = max(peak, len(os.listdir(f"/proc/{pid}/fd")))
        await asyncio.sleep(0.5)
    return peak


async def _run(
    url: str, connections: int, seconds: float, pid: int | None, served: bool = False
) -> None:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    seen: collections.Counter[str] = collections.Counter()
    got: collections.Counter[str] = collections.Counter()
    fds = asyncio.create_task(_peak_fds(pid, seconds)) if pid else None
    probe = asyncio.create_task(_probe(host, port, seconds, got))
    slow = []
    for i in range(connections):
        slow.append(asyncio.create_task(_slow_client(host, port, seconds, seen, served)))
        if i % OPEN_BATCH == OPEN_BATCH - 1:
            await asyncio.sleep(0.05)
    await asyncio.gather(probe, *slow)
    kind = "served-once then slow" if served else "slow"
    print(f"{connections} {kind} connections over {seconds:g} s: {dict(seen)}")
    print(f"probes (a new connection every {PROBE_INTERVAL_S} s): {dict(got)}")
    if fds is not None:
        print(f"most open file descriptors of pid {pid}: {await fds}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.slowloris", description=__doc__)
    parser.add_argument("url", help="a running router, e.g. http://127.0.0.1:8000")
    parser.add_argument("--connections", type=int, default=3000)
    parser.add_argument("--seconds", type=float, default=25.0)
    parser.add_argument("--pid", type=int, help="the router's pid: report its peak open files")
    parser.add_argument(
        "--served", action="store_true", help="each completes one request before trickling"
    )
    args = parser.parse_args(argv)
    asyncio.run(_run(args.url, args.connections, args.seconds, args.pid, args.served))


if __name__ == "__main__":
    main()
