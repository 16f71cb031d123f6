"""Connection limits below the app: a cap on open connections and a deadline for request heads.

Why in uvicorn's HTTP protocol and not in the app: a client that never completes its request head
(slowloris) never reaches the ASGI app, and uvicorn has no head timeout (its keep-alive timer stops
at the first byte). Why not uvicorn's ``limit_concurrency``: it counts open connections at every
request, so once idle connections pass the limit, requests on established keep-alive connections
are answered 503 and their connections closed. Here the cap is decided when a connection opens:

- beyond ``limits.max_connections`` open connections a new one displaces a connection that is
  waiting for a request head: first the oldest that has not completed a request yet (a slow or
  silent client), else the one served longest ago that has not completed its next head since (an
  idle keep-alive connection, or one stalled mid-head: served once is not a pass for ever). None
  of a displaced connection's requests is being processed, so its client may retry safely; a
  connection with a request in progress is never displaced. When every open connection has a
  request in progress, the new one is answered 503 (``Connection: close``) to its first request;
- a connection without a complete request head ``limits.header_read_timeout_s`` after connecting
  (or after its last response) is closed, with a 408 when part of a head came;
- a request head over 16 KiB is a 400, whatever the read size: httptools buffers a head of any
  size and h11 bounds only a head still incomplete (one that arrives whole in one read passed
  both), so the bound is applied to the parsed head before the app, and while a head arrives;
- uvicorn's protocol warnings (each ``Upgrade:`` request wrote two lines, each malformed request
  one) are logged at most once per message every ``LOG_INTERVAL_S``, with the count held back.

Both uvicorn implementations (h11, httptools) get the same rules. Each close is counted in
``router_connections_closed_total{reason}`` on the app's registry and logged at most every
``LOG_INTERVAL_S``.
"""

from __future__ import annotations

import asyncio
import functools
import http
import importlib.util
import logging
import time
from collections import Counter as Tally
from typing import TYPE_CHECKING, Any, Literal, cast

import orjson
from prometheus_client import Counter

from router.config import LimitSettings
from router.errors import BadRequest, RequestTimeout, RouterError, TooManyConnections

if TYPE_CHECKING:  # the mixins are typed as the protocols they extend; plain classes at run time
    from uvicorn.protocols.http.h11_impl import H11Protocol as _Guarded
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as _HttpTools
else:
    _Guarded = _HttpTools = object

log = logging.getLogger(__name__)

Implementation = Literal["auto", "h11", "httptools"]
REASONS = ("displaced", "max_connections", "head_timeout")
MAX_HEAD_BYTES = 16 * 1024  # h11's own bound (uvicorn's h11_max_incomplete_event_size)
LOG_INTERVAL_S = 10.0


def _answer(error: RouterError) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """Headers and body of an answer that closes the connection, in the router's error shape."""
    body = orjson.dumps(error.to_dict())
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode("ascii")),
        (b"x-content-type-options", b"nosniff"),
        (b"connection", b"close"),
    ]
    return headers, body


def _raw(error: RouterError) -> bytes:
    """The same answer as bytes, for a connection whose request never reached the app."""
    headers, body = _answer(error)
    status = f"HTTP/1.1 {error.status_code} {http.HTTPStatus(error.status_code).phrase}\r\n"
    lines = b"".join(name + b": " + value + b"\r\n" for name, value in headers)
    return status.encode("ascii") + lines + b"\r\n" + body


class ConnectionGuard:
    """One per server process: its limits, its connections waiting for a head (oldest first, those
    never served apart), counts."""

    def __init__(self, limits: LimitSettings) -> None:
        self.max_connections = limits.max_connections
        self.header_read_timeout_s = limits.header_read_timeout_s
        self.unserved: dict[_HeadGuard, None] = {}  # no request completed yet
        self.idle: dict[_HeadGuard, None] = {}  # served, waiting for their next request head
        self._full = TooManyConnections(
            f"more than {self.max_connections} open connections (limits.max_connections)"
        )
        self.full = _raw(self._full)
        self.timed_out = _raw(
            RequestTimeout(
                f"request head not received within {self.header_read_timeout_s:g} s "
                "(limits.header_read_timeout_s)"
            )
        )
        self._closed: Counter | None = None
        self._unlogged: Tally[str] = Tally()
        self._log_after = 0.0
        self.protocol_log = _ThrottledLog(logging.getLogger("uvicorn.error"))
        self._bounded: tuple[Any, _HeadLimit] | None = None

    def head_limited(self, app: Any) -> _HeadLimit:
        """``app`` behind the head-size bound (one wrapper per app, shared by connections)."""
        if self._bounded is None or self._bounded[0] is not app:
            self._bounded = (app, _HeadLimit(app))
        return self._bounded[1]

    def bind(self, app_state: dict[str, Any]) -> None:
        """Count on the app's registry (the lifespan state's service), once it is there."""
        service = app_state.get("service")
        if self._closed is None and service is not None:
            self._closed = Counter(
                "router_connections_closed",
                "Connections closed or refused to protect the server, by reason.",
                ["reason"],
                registry=service.metrics.registry,
            )
            for reason in REASONS:
                self._closed.labels(reason)

    def displaceable(self) -> _HeadGuard | None:
        """The connection a newcomer beyond the cap displaces, if any."""
        return next(iter(self.unserved), None) or next(iter(self.idle), None)

    def forget(self, connection: _HeadGuard) -> None:
        self.unserved.pop(connection, None)
        self.idle.pop(connection, None)

    def record(self, reason: str) -> None:
        if self._closed is not None:
            self._closed.labels(reason).inc()
        self._unlogged[reason] += 1
        now = time.monotonic()
        if now >= self._log_after:  # a flood of hostile clients must not flood the log too
            counts = ", ".join(f"{n} {r}" for r, n in sorted(self._unlogged.items()))
            log.warning(
                "connections closed to protect the server: %s (limits.max_connections %d, "
                "limits.header_read_timeout_s %g)",
                counts,
                self.max_connections,
                self.header_read_timeout_s,
            )
            self._unlogged.clear()
            self._log_after = now + LOG_INTERVAL_S

    async def refuse(self, scope: Any, receive: Any, send: Any) -> None:
        """The ASGI app of a connection opened beyond the cap: 503 to its request."""
        headers, body = _answer(self._full)
        status = self._full.status_code
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class _HeadLimit:
    """The ASGI app behind a bound on the parsed request head: whatever arrived in one read."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._too_large = _answer(
            BadRequest(f"request head over {MAX_HEAD_BYTES} bytes (the request line and headers)")
        )

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and head_size(scope) > MAX_HEAD_BYTES:
            headers, body = self._too_large
            await send({"type": "http.response.start", "status": 400, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


def head_size(scope: Any) -> int:
    """The bytes of a request's head as parsed: request line, header lines, the blank line."""
    line = len(scope["method"]) + 1 + len(scope.get("raw_path") or b"") + len(" HTTP/1.1\r\n")
    query = scope.get("query_string") or b""
    if query:
        line += 1 + len(query)
    fields = sum(len(name) + len(value) + 4 for name, value in scope["headers"])
    return line + fields + 2


class _ThrottledLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """uvicorn's protocol logger (``self.logger`` of every connection) with each warning message
    logged at most once every ``LOG_INTERVAL_S``: a client repeating a protocol fault must not
    flood the log. Errors pass unchanged."""

    def __init__(self, logger: logging.Logger) -> None:
        super().__init__(logger, {})
        self._quiet_until: dict[str, float] = {}
        self._held: Tally[str] = Tally()

    @property
    def level(self) -> int:  # uvicorn reads its logger's level to decide on trace lines
        return int(self.logger.level)

    def warning(self, msg: object, *args: Any, **kwargs: Any) -> None:
        key, now = str(msg), time.monotonic()
        if now < self._quiet_until.get(key, 0.0):
            self._held[key] += 1
            return
        if len(self._quiet_until) > 100:  # uvicorn's messages are a few constants; stay bounded
            self._quiet_until.clear()
        self._quiet_until[key] = now + LOG_INTERVAL_S
        held = self._held.pop(key, 0)
        if held:
            msg = f"{msg} (and {held} more in the last {LOG_INTERVAL_S:g} s, not logged)"
        self.logger.warning(msg, *args, **kwargs)


class _HeadGuard(_Guarded):
    """The cap and the head deadline, over either uvicorn protocol (their shared attributes)."""

    def __init__(
        self,
        config: Any,
        server_state: Any,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        guard: ConnectionGuard,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._guard = guard
        self.logger = guard.protocol_log  # type: ignore[assignment]
        self.app = guard.head_limited(self.app)
        self._deadline: asyncio.TimerHandle | None = None
        self._awaited: object = None  # the cycle when the deadline was set: a new one = a head
        self._partial = False  # bytes came since the deadline was set

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        guard = self._guard
        guard.bind(self.app_state)
        if len(self.connections) > guard.max_connections:
            displaced = guard.displaceable()
            if displaced is not None:
                displaced._expire("displaced", guard.full)
            else:
                self.app = guard.refuse
                guard.record("max_connections")
        self._expect_head(guard.unserved)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_deadline()
        self._guard.forget(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._deadline is None:  # a request in progress: nothing to watch
            super().data_received(data)
            return
        self._partial = True
        super().data_received(data)
        if self.cycle is not self._awaited:  # a request head is complete
            self._stop_deadline()
            self._guard.forget(self)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.cycle.response_complete:
            # keep-alive: the next head has the same deadline, and until it is complete this
            # connection may be displaced (after those never served)
            self._expect_head(self._guard.idle)

    def _expect_head(self, queue: dict[_HeadGuard, None]) -> None:
        """Wait for a request head: under the deadline, and displaceable (``queue``) meanwhile."""
        self._guard.forget(self)
        queue[self] = None  # last in its queue: the most recent to start waiting
        self._stop_deadline()
        self._awaited = self.cycle
        self._partial = False
        self._deadline = self.loop.call_later(
            self._guard.header_read_timeout_s, self._expire, "head_timeout", self._guard.timed_out
        )

    def _stop_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self, reason: str, answer: bytes) -> None:
        self._stop_deadline()
        self._guard.forget(self)
        if self.transport.is_closing() or self.transport.get_protocol() is not self:
            return
        # An idle keep-alive connection timing out is routine; a displaced one, one that never
        # completed a request, or one stalled within a head is what the limits are for.
        if reason == "displaced" or self.cycle is None or self._partial:
            self._guard.record(reason)
        if self._partial:
            self.transport.write(answer)
        self.connections.discard(self)  # no longer counts against the cap while it closes
        self.transport.close()


class _HeadBound(_HttpTools):
    """httptools keeps a head of any size; h11 (uvicorn's 400) stops at MAX_HEAD_BYTES while a
    head is incomplete: the memory bound while it arrives (``_HeadLimit`` bounds a whole one)."""

    _head_bytes = 0
    _in_head = False

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._head_bytes = 0

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._in_head and not self.transport.is_closing():
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self.send_400_response("Request head too large.")


@functools.cache
def _protocol_class(implementation: str) -> type[asyncio.Protocol]:
    if implementation == "h11":
        from uvicorn.protocols.http.h11_impl import H11Protocol

        return type("GuardedH11Protocol", (_HeadGuard, H11Protocol), {})
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    return type("GuardedHttpToolsProtocol", (_HeadGuard, _HeadBound, HttpToolsProtocol), {})


def _new_protocol(
    config: Any,
    server_state: Any,
    app_state: dict[str, Any],
    _loop: asyncio.AbstractEventLoop | None = None,
    *,
    guard: ConnectionGuard,
    implementation: str,
) -> asyncio.Protocol:
    protocol_class = cast(Any, _protocol_class(implementation))
    protocol: asyncio.Protocol = protocol_class(config, server_state, app_state, _loop, guard=guard)
    return protocol


def http_protocol(
    limits: LimitSettings, implementation: Implementation = "auto"
) -> type[asyncio.Protocol]:
    """uvicorn's ``http=`` for one server: its protocol (``auto``: httptools when installed, as
    uvicorn chooses) with ``limits`` applied.

    A picklable factory (``--workers N`` sends the config to each worker), not a class: uvicorn
    calls it as it calls a protocol class.
    """
    if implementation == "auto":
        implementation = "httptools" if importlib.util.find_spec("httptools") else "h11"
    log.info(
        "connections: at most %d open per worker, request heads within %g s (%s)",
        limits.max_connections,
        limits.header_read_timeout_s,
        implementation,
    )
    factory = functools.partial(
        _new_protocol, guard=ConnectionGuard(limits), implementation=implementation
    )
    return cast("type[asyncio.Protocol]", factory)
