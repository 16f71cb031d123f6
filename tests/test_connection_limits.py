"""Hostile connections on real servers, under both uvicorn HTTP implementations: a request head sent
too slowly is answered 408 and closed while other clients are served, a silent connection is
closed, a huge head is refused, and beyond ``limits.max_connections`` a connection waiting for a
request head (never served first, then idle or stalled after being served) is displaced before a
new one is refused with a 503; a connection with a request in progress is never displaced.
``python -m router`` applies the limits with one worker and with ``--workers``.
"""

from __future__ import annotations

import http.client
import re
import select
import socket
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import pytest

from bench import slowloris
from router.config import Settings
from router.server.app import create_app
from router.server.connlimits import http_protocol
from tests.conftest import MlflowRegistry, serve_in_thread
from tests.live_router import router_settings, wait_until
from tests.metrics_text import Scrape
from tests.router_process import router_process

IMPLEMENTATIONS = ["h11", "httptools"]
SOCKET_TIMEOUT_S = 30.0  # bounds a test; assertions are on answers, never on times
TRICKLE_PAUSE_S = 0.05
MAX_TRICKLE_STEPS = 600  # x TRICKLE_PAUSE_S: a bound far beyond the 1 s deadline under test
SLOW_HEAD = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: "
GET = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
UNFINISHED_POST = (
    b"POST /feedback HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Content-Length: 8\r\n\r\n{"
)
UNFINISHED_POST_REST = b'"a": 1}'


@contextmanager
def _serving(settings: Settings, implementation: str) -> Iterator[int]:
    """The router on an ephemeral port with its limits in ``implementation``; yields the port."""
    protocol = http_protocol(settings.limits, implementation)  # type: ignore[arg-type]
    with serve_in_thread(create_app(settings), http=protocol) as base_url:
        yield int(base_url.rsplit(":", 1)[1])


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT_S)


def _read_until_closed(sock: socket.socket) -> bytes:
    answer = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return answer
        if not chunk:
            return answer
        answer += chunk


def _exchange(sock: socket.socket, request: bytes) -> bytes:
    """Send ``request`` on ``sock`` and read one whole answer (its head and Content-Length body)."""
    sock.sendall(request)
    answer = b""
    while b"\r\n\r\n" not in answer:
        chunk = sock.recv(65536)
        if not chunk:
            return answer
        answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    while length and len(body) < int(length.group(1)):
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def _get(port: int, path: str, connection: http.client.HTTPConnection | None = None) -> int:
    """Status of GET ``path`` on ``connection`` (kept open, keep-alive) or on a new one."""
    conn = connection or http.client.HTTPConnection("127.0.0.1", port, timeout=SOCKET_TIMEOUT_S)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        if connection is None:
            conn.close()


def _closed_counts(port: int) -> dict[str, float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=SOCKET_TIMEOUT_S).text
    return {
        labels["reason"]: value
        for labels, value in Scrape.parse(text).values("router_connections_closed_total")
    }


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_a_slow_head_is_answered_408_and_a_silent_connection_closed_while_others_are_served(
    mlflow_registry: MlflowRegistry, tmp_path: Path, implementation: str
) -> None:
    settings = router_settings(
        mlflow_registry, tmp_path / "log.db", limits={"header_read_timeout_s": 1}
    )
    with _serving(settings, implementation) as port, _connect(port) as silent:
        with _connect(port) as slow:
            for step in range(MAX_TRICKLE_STEPS):  # one byte at a time, never the head's end
                readable, _, _ = select.select([slow], [], [], TRICKLE_PAUSE_S)
                if readable:
                    break
                slow.send(SLOW_HEAD[step : step + 1] or b"x")
                assert _get(port, "/healthz") == 200  # everyone else is served meanwhile
            else:
                pytest.fail("a head trickled byte by byte held its connection open")
            answer = _read_until_closed(slow)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"limits.header_read_timeout_s" in answer
        assert _read_until_closed(silent) == b""  # closed without an answer: it asked nothing
        assert _closed_counts(port)["head_timeout"] == 2


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_a_head_over_16_kib_is_refused(
    mlflow_registry: MlflowRegistry, tmp_path: Path, implementation: str
) -> None:
    """httptools alone would buffer a head of any size: the same bound as h11's applies."""
    settings = router_settings(mlflow_registry, tmp_path / "log.db")
    with _serving(settings, implementation) as port, _connect(port) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
        try:
            for _ in range(64):  # 64 KiB, never the head's end
                sock.sendall(b"a" * 1024)
        except OSError:
            pass  # the server refused and closed before it was all sent
        answer = _read_until_closed(sock)
        assert answer == b"" or answer.startswith(b"HTTP/1.1 400"), answer[:200]
        assert _get(port, "/healthz") == 200


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_the_head_limit_holds_when_the_whole_head_arrives_in_one_read(
    mlflow_registry: MlflowRegistry, tmp_path: Path, implementation: str
) -> None:
    """Issue 20, item 9: 17 KB and 60 KB heads sent in one write were answered 200."""
    settings = router_settings(mlflow_registry, tmp_path / "log.db")
    with _serving(settings, implementation) as port:
        for size, status in [(15_000, b"200"), (17_000, b"400"), (60_000, b"400")]:
            head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * size + b"\r\n\r\n"
            with _connect(port) as sock:
                answer = _exchange(sock, head)
            assert answer.startswith(b"HTTP/1.1 " + status), (size, answer[:300])
            if status == b"400":
                assert b"request head over 16384 bytes" in answer, answer[:300]
        assert _get(port, "/healthz") == 200


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_repeated_protocol_warnings_are_rate_limited(
    mlflow_registry: MlflowRegistry,
    tmp_path: Path,
    implementation: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Issue 20, item 9: each ``Upgrade:`` request wrote two warning lines."""
    settings = router_settings(mlflow_registry, tmp_path / "log.db")
    upgrade = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
    with (
        caplog.at_level("WARNING", logger="uvicorn.error"),
        _serving(settings, implementation) as port,
    ):
        for _ in range(20):
            with _connect(port) as sock:
                assert _exchange(sock, upgrade).startswith(b"HTTP/1.1 ")
    upgrades = [r for r in caplog.records if r.getMessage() == "Unsupported upgrade request."]
    assert len(upgrades) == 1, [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_beyond_the_cap_an_unserved_then_an_idle_connection_is_displaced_else_a_503(
    mlflow_registry: MlflowRegistry, tmp_path: Path, implementation: str
) -> None:
    settings = router_settings(mlflow_registry, tmp_path / "log.db", limits={"max_connections": 2})
    with _serving(settings, implementation) as port:
        served = http.client.HTTPConnection("127.0.0.1", port, timeout=SOCKET_TIMEOUT_S)
        assert _get(port, "/healthz", served) == 200  # open and kept alive: 1 of 2
        with _connect(port) as slow:
            slow.sendall(SLOW_HEAD)  # 2 of 2, has not completed a request
            newcomer = http.client.HTTPConnection("127.0.0.1", port, timeout=SOCKET_TIMEOUT_S)
            assert _get(port, "/healthz", newcomer) == 200  # the slow one made room
            displaced = _read_until_closed(slow)
        assert displaced.startswith(b"HTTP/1.1 503"), displaced[:200]

        # Both open connections are served and idle: a third displaces the one idle longest,
        # silently (it asked nothing), and is served.
        third = _connect(port)
        assert _exchange(third, GET).startswith(b"HTTP/1.1 200")
        assert _read_until_closed(served.sock) == b""
        assert _get(port, "/healthz", newcomer) == 200  # served more recently: kept

        # Connections with a request in progress are never displaced: a fourth is refused.
        newcomer_sock = newcomer.sock
        for busy in (newcomer_sock, third):
            busy.sendall(UNFINISHED_POST)
        with _connect(port) as fourth:
            fourth.sendall(GET)
            refused = _read_until_closed(fourth)
        assert refused.startswith(b"HTTP/1.1 503"), refused[:200]
        assert b"too_many_connections" in refused and b"limits.max_connections" in refused
        for busy in (newcomer_sock, third):
            answer = _exchange(busy, UNFINISHED_POST_REST)
            assert answer.startswith(b"HTTP/1.1 4"), answer[:200]  # answered, not refused

        # A connection closes: new ones are served again (once the server has seen it close).
        third.close()
        wait_until(lambda: _get(port, "/healthz") == 200, "a new connection to be served")
        counts = _closed_counts(port)
        newcomer.close()
        served.close()
    assert counts["displaced"] == 2 and counts["max_connections"] >= 1


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_connections_served_once_then_stalled_mid_head_do_not_lock_new_clients_out(
    mlflow_registry: MlflowRegistry, tmp_path: Path, implementation: str
) -> None:
    """Issue 20, item 5: with every slot held by a connection that completed one request and then
    trickles its next head, every new connection got a 503; served once is no pass for ever."""
    cap = 5
    settings = router_settings(
        mlflow_registry, tmp_path / "log.db", limits={"max_connections": cap}
    )
    with _serving(settings, implementation) as port, ExitStack() as stack:
        stalled = [stack.enter_context(_connect(port)) for _ in range(cap)]
        for sock in stalled:
            assert _exchange(sock, GET).startswith(b"HTTP/1.1 200")
            sock.sendall(SLOW_HEAD)  # the next head, never finished
        # New clients that stay connected: each beyond the cap displaces a waiting connection.
        for _ in range(2 * cap):
            client = stack.enter_context(_connect(port))
            assert _exchange(client, GET).startswith(b"HTTP/1.1 200")
        for sock in stalled:  # each was displaced, with a 503 to the head it had started
            assert _read_until_closed(sock).startswith(b"HTTP/1.1 503")
        assert _closed_counts(port)["displaced"] >= cap


@pytest.mark.parametrize("workers", [1, 2])
def test_python_m_router_closes_a_slow_head(
    mlflow_registry: MlflowRegistry, tmp_path: Path, workers: int
) -> None:
    limits = {"limits": {"header_read_timeout_s": 1}}
    with (
        router_process(
            mlflow_registry, tmp_path, workers=workers, sections=limits, wait_for="/healthz"
        ) as router,
        _connect(router.port) as slow,
    ):
        slow.sendall(SLOW_HEAD)
        answer = _read_until_closed(slow)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]


def test_the_slowloris_bench_reports_how_slow_connections_ended(
    mlflow_registry: MlflowRegistry, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = router_settings(
        mlflow_registry, tmp_path / "log.db", limits={"header_read_timeout_s": 1}
    )
    with _serving(settings, "h11") as port:
        slowloris.main([f"http://127.0.0.1:{port}", "--connections", "20", "--seconds", "4"])
    out = capsys.readouterr().out
    assert "{'HTTP/1.1 408': 20}" in out, out
    assert re.search(r"probes .*: \{'HTTP/1.1 200': \d+\}$", out, re.MULTILINE), out
