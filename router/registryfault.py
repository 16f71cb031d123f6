"""One line for every way the MLflow registry fails to answer, the same in the router and the
evaluator, and how hard both try before saying it.

MLflow's REST client reports a wrong tracking URI as ~400 characters of nested urllib3 reprs
("HTTPConnectionPool(host=...): Max retries exceeded with url: ... (Caused by NewConnectionError(
...))"). :func:`describe` reads the exception chain instead and names the cause a person can act
on: connection refused, an unknown host, TLS, a timeout, an HTTP status, a database error.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import ssl
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, redirect_stdout
from typing import TextIO
from urllib.parse import urlsplit

import requests
import sqlalchemy as sa
from mlflow.exceptions import MlflowException

from router.errors import RegistryUnavailable

#: What a call to the registry raises when the registry, not the caller, is at fault: MLflow's own
#: errors, the SQL store's database errors, and the network's or the file system's.
REGISTRY_FAILURES: tuple[type[Exception], ...] = (MlflowException, sa.exc.SQLAlchemyError, OSError)

#: MLflow's HTTP client retries with exponential backoff for minutes by default: a registry that
#: is down would keep the router's start-up and the evaluator silent that long. Two retries a
#: second apart (plus jitter) still ride out a blip; the router retries on its own schedule, a
#: scheduled evaluation at its next run. A value set by the user wins.
FAIL_FAST_HTTP: Mapping[str, str] = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",  # MLflow reads an integer
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
}

_MAX_CHARS = 300
# MLflow's text for a non-JSON HTTP answer (a proxy's, or a path that is not its REST API).
_HTTP_STATUS = re.compile(r"failed with error code (\d{3}) != 200")


def registry_unavailable(tracking_uri: str, exc: BaseException) -> RegistryUnavailable:
    """``RegistryUnavailable("MLflow registry at <uri>: <cause>")``: raise it ``from exc``."""
    return RegistryUnavailable(f"MLflow registry at {tracking_uri}: {describe(exc, tracking_uri)}")


def describe(exc: BaseException, tracking_uri: str | None = None) -> str:
    """The cause of a registry failure in a few words, without the URL MLflow repeats."""
    chain = list(_chain(exc))
    for found in chain:
        if isinstance(found, ssl.SSLError):
            why = found.reason or str(found)
            return f"TLS failed ({why}): is the server https, and its certificate trusted?"
    for found in chain:
        if isinstance(found, socket.gaierror):
            host = urlsplit(tracking_uri).hostname if tracking_uri else None
            return f"cannot resolve the host name {host!r}" if host else "cannot resolve the host"
    for found in chain:
        if isinstance(found, ConnectionRefusedError):
            return "connection refused (no server listening there: check the URI and port)"
        if isinstance(found, TimeoutError | requests.exceptions.Timeout):
            return "no answer in time (MLFLOW_HTTP_REQUEST_TIMEOUT)"
    for found in chain:
        if isinstance(found, OSError) and found.errno in _ERRNO_WORDS:
            return _ERRNO_WORDS[found.errno]
    if isinstance(exc, MlflowException):
        status = _HTTP_STATUS.search(exc.message)
        if status is not None:
            return _http_status(int(status.group(1)))
        return _one_line(exc.message)
    if isinstance(exc, sa.exc.SQLAlchemyError):
        orig = getattr(exc, "orig", None) or exc
        first = str(orig).strip().splitlines()[:1]  # drivers put hints on further lines
        return _one_line(f"{type(orig).__name__}: {''.join(first)}")
    if isinstance(exc, OSError) and exc.strerror:
        return _one_line(f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror)
    return _one_line(str(exc) or type(exc).__name__)


_ERRNO_WORDS = {
    errno.EHOSTUNREACH: "host unreachable",
    errno.ENETUNREACH: "network unreachable",
    errno.ECONNRESET: "connection reset by the server",
}


def _http_status(status: int) -> str:
    if status == 404:
        return "HTTP 404: no MLflow REST API at this URI (check its path)"
    if status in (401, 403):
        return (
            f"HTTP {status}: not authorised (set MLFLOW_TRACKING_TOKEN, or "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD)"
        )
    return f"HTTP {status} from the server"


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what caused it: ``__cause__``, ``__context__``, and the exceptions requests
    and urllib3 wrap in ``args`` and ``reason``; each once."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        current = todo.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        wrapped = [current.__cause__, current.__context__, getattr(current, "reason", None)]
        wrapped.extend(current.args)
        todo.extend(w for w in wrapped if isinstance(w, BaseException))


def _one_line(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= _MAX_CHARS else line[: _MAX_CHARS - 3] + "..."


@contextmanager
def fail_fast_http() -> Iterator[None]:
    """MLflow's HTTP retries as the router sets them (:data:`FAIL_FAST_HTTP`): a registry that is
    down fails in seconds; the next scheduled run tries again. A value set by the user wins."""
    added = [key for key in FAIL_FAST_HTTP if key not in os.environ]
    os.environ.update({key: FAIL_FAST_HTTP[key] for key in added})
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


@contextmanager
def stdout_reserved() -> Iterator[TextIO]:
    """Yield the real stdout, and send every other write to ``sys.stdout`` to stderr meanwhile.

    A command's stdout is a contract (the table, or with ``--json -`` one JSON document), but
    MLflow's client writes "View run ... / View experiment at: ..." to ``sys.stdout`` whenever a
    run on an HTTP tracking server ends, and any library may print. Only what the command writes to
    the stream yielded here reaches stdout; the rest still reaches the person, on stderr.
    """
    stdout = sys.stdout
    with redirect_stdout(sys.stderr):
        yield stdout
