"""``--workers N``: a supervisor process and N uvicorn workers, one listening socket per worker.

Why not uvicorn's own multiprocess mode: it binds one socket without ``IPPROTO_TCP``, so asyncio
never sets ``TCP_NODELAY`` on accepted connections and each keep-alive response waits for the
client's delayed ACK (~40 ms); and the workers share that one socket, so a pooled client's
connections all land on whichever worker happened to accept first. Here the supervisor binds one
``SO_REUSEPORT`` socket per worker (TCP explicitly): the kernel spreads new connections across them.

A worker takes traffic only once its champion is loaded. Sockets join the kernel's spreading only
when they listen, so the first worker's socket listens at once (it answers ``/healthz``, and
``/readyz`` 503 with the reason, as a single process does) and every other worker's socket is bound
but listens only when that worker has loaded its champion and some listening worker has too (the
ready marker, a file the first ready worker creates). ``/readyz`` therefore never flaps between
workers at start-up, and no request reaches a worker still loading. A replacement for a dead worker
joins the same way when another worker is listening, else at once.

Process hygiene: a worker dies with its supervisor (``PR_SET_PDEATHSIG`` on Linux, else a thread
polling ``getppid``), shutting down gracefully on the SIGTERM it gets; the port is checked free
before binding, so a second router (or an orphaned worker) is an explicit "address in use", never a
silent share of the port; ``SO_REUSEADDR`` lets a restart after a crash bind despite TIME_WAIT.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from prometheus_client import multiprocess as prom_multiprocess
from uvicorn import Config
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors.multiprocess import Process

from router.metrics import multiprocess_dir

log = logging.getLogger(__name__)

LISTEN_BACKLOG = 2048
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
PARENT_POLL_S = 1.0
CHECK_INTERVAL_S = 0.5
READY_POLL_S = 0.1
# How a worker learns, from its own environment, how to join the port (WorkerStart.from_env).
READY_MARKER_ENV = "ROUTER_WORKER_READY_MARKER"
LISTEN_WHEN_READY_ENV = "ROUTER_WORKER_LISTEN_WHEN_READY"


@dataclass(frozen=True)
class WorkerStart:
    """How a worker under the supervisor joins the port; None for a single process."""

    ready_marker: Path  # created by the first listening worker whose champion is loaded
    listen_when_ready: bool  # listen only once this worker's champion is loaded (and the marker)

    @classmethod
    def from_env(cls) -> WorkerStart | None:
        marker = os.environ.get(READY_MARKER_ENV)
        if not marker:
            return None
        return cls(Path(marker), os.environ.get(LISTEN_WHEN_READY_ENV) == "1")

    def announce_ready(self) -> None:
        """This (listening) worker's champion is loaded: waiting workers may join."""
        self.ready_marker.touch()

    async def wait_to_listen(self, champion_loaded: Callable[[], bool]) -> None:
        """Return once this worker's champion is loaded and some listening worker's is, or at
        SIGTERM/SIGINT (uvicorn then starts and stops at once, gracefully).

        Runs in the lifespan's start-up, before uvicorn listens; uvicorn's own signal handlers are
        kept and called, so a stop asked for meanwhile is not lost.
        """
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
        # A stop that reached uvicorn's own handler before this one was installed (a SIGTERM
        # while the worker was still starting) must end the wait too, or the worker of a champion
        # that never loads waits for good: uvicorn's handler is its server's bound handle_exit.
        server = getattr(previous[signal.SIGTERM], "__self__", None)

        def stop_requested() -> bool:
            return stop.is_set() or getattr(server, "should_exit", False) is True

        def on_signal(signum: int, frame: FrameType | None) -> None:
            loop.call_soon_threadsafe(stop.set)
            handler = previous[signal.Signals(signum)]
            if callable(handler):
                handler(signum, frame)

        for sig in previous:
            signal.signal(sig, on_signal)
        try:
            while not stop_requested() and not (champion_loaded() and self.ready_marker.exists()):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), READY_POLL_S)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _address(host: str, port: int) -> tuple[socket.AddressFamily, tuple[str, int]]:
    family, _, _, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )[0]
    return family, (str(address[0]), int(address[1]))


def claim_port(host: str, port: int) -> int:
    """Fail with ``OSError`` (EADDRINUSE) when anything listens on ``host:port``; return the port.

    The probe binds without ``SO_REUSEPORT``: the kernel refuses it next to any listener, even one
    of our own reuse-port sockets left by an orphaned worker. Port 0 picks a free port.
    """
    family, address = _address(host, port)
    with socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no conflict
        probe.bind(address)
        return int(probe.getsockname()[1])


def bound_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` beside the other workers' sockets, not listening yet:
    the kernel sends it no connection until its worker's server listens on it.

    ``IPPROTO_TCP`` explicitly: asyncio sets ``TCP_NODELAY`` on accepted connections only when the
    listening socket says it is TCP.
    """
    family, address = _address(host, port)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket sharing ``host:port`` with the other workers' sockets, listening now."""
    sock = bound_socket(host, port)
    try:
        sock.listen(LISTEN_BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


def _listening(sock: socket.socket) -> bool:
    return sock.fileno() >= 0 and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) != 0


def die_with_parent(parent_pid: int) -> None:
    """Have this process receive SIGTERM (a graceful shutdown) when ``parent_pid`` exits."""
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    else:
        threading.Thread(
            target=_watch_parent, args=(parent_pid,), name="parent-watch", daemon=True
        ).start()
    if os.getppid() != parent_pid:  # the parent died before the request above took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _watch_parent(parent_pid: int) -> None:
    stop = threading.Event()
    while not stop.wait(PARENT_POLL_S):
        if os.getppid() != parent_pid:
            os.kill(os.getpid(), signal.SIGTERM)
            return


class Worker(Process):
    """uvicorn's worker process on its own socket (listening, or to listen once ready)."""

    def __init__(self, config: Config, sock: socket.socket, start: WorkerStart) -> None:
        super().__init__(config, [sock])
        # Pickled with the target when the process starts.
        self.supervisor_pid = os.getpid()
        self.start_rule = start

    def target(self, sockets: list[socket.socket] | None = None) -> None:  # pragma: no cover
        die_with_parent(self.supervisor_pid)
        os.environ[READY_MARKER_ENV] = str(self.start_rule.ready_marker)
        os.environ[LISTEN_WHEN_READY_ENV] = "1" if self.start_rule.listen_when_ready else "0"
        super().target(sockets)


class Supervisor:
    """Runs ``workers`` copies of the app described by ``config``; restarts a worker that dies."""

    def __init__(self, config: Config, workers: int) -> None:
        self.config = config
        self.workers = workers
        self._stop = threading.Event()
        self._status = 0
        self._port = 0  # the port claimed (a free one when config.port is 0)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._stop.set()

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; return the exit status (0 after a graceful stop)."""
        host = self.config.host
        try:
            port = self._port = claim_port(host, self.config.port)
            # The first worker listens at once; the others once their champion is loaded.
            sockets = [listening_socket(host, port)]
            sockets += [bound_socket(host, port) for _ in range(self.workers - 1)]
        except OSError as exc:
            log.error("cannot listen on %s:%s: %s", host, self.config.port, exc.strerror or exc)
            return 1
        for handled in (signal.SIGTERM, signal.SIGINT):
            signal.signal(handled, self._on_signal)
        log.info("supervisor %d: %d workers on %s:%d", os.getpid(), self.workers, host, port)
        marker_dir = Path(tempfile.mkdtemp(prefix="router-ready-"))
        marker = marker_dir / "ready"
        processes: list[Process] = [
            self._start(sock, WorkerStart(marker, listen_when_ready=i > 0))
            for i, sock in enumerate(sockets)
        ]
        try:
            while not self._stop.wait(CHECK_INTERVAL_S):
                for i, process in enumerate(processes):
                    # Only a worker that exited is replaced. A health-check timeout is no proof of a
                    # hang on a starved machine, and killing a live worker loses its queued log.
                    if process.exitcode is not None:
                        processes[i], sockets[i] = self._replace(process, sockets, i, marker)
        finally:
            # New connections are refused from here on, not queued behind a stopping worker.
            for sock in sockets:
                sock.close()
            for process in processes:
                process.terminate()
            for process in processes:
                process.join()
                self._forget(process)
            shutil.rmtree(marker_dir, ignore_errors=True)
        log.info("supervisor %d: stopped", os.getpid())
        return self._status

    def _start(self, sock: socket.socket, start: WorkerStart) -> Worker:
        worker = Worker(self.config, sock, start)
        worker.start()
        log.info(
            "worker %s started (%s)",
            worker.pid,
            "listens once its champion is loaded" if start.listen_when_ready else "listening",
        )
        return worker

    def _replace(
        self, process: Process, sockets: list[socket.socket], i: int, marker: Path
    ) -> tuple[Process, socket.socket]:
        process.join()
        self._forget(process)
        if process.exitcode == STARTUP_FAILURE:
            # The app cannot start (bad config, broken import): restarting would fail the same way.
            log.error("worker %s failed to start; stopping", process.pid)
            self._status = STARTUP_FAILURE
            self._stop.set()
            return process, sockets[i]
        log.error("worker %s died (exit %s); starting a new one", process.pid, process.exitcode)
        # The dead worker's socket leaves the port (its queued connections are reset, not left
        # waiting for a new process); the new one joins once ready, unless no other worker listens.
        sockets[i].close()
        others_listen = any(_listening(s) for j, s in enumerate(sockets) if j != i)
        host, port = self.config.host, self._port
        try:
            sock = bound_socket(host, port) if others_listen else listening_socket(host, port)
        except OSError as exc:
            log.error("cannot rebind %s:%s for a new worker: %s", host, port, exc)
            self._status = 1
            self._stop.set()
            return process, sockets[i]
        return self._start(sock, WorkerStart(marker, listen_when_ready=others_listen)), sock

    @staticmethod
    def _forget(process: Process) -> None:
        # Its live gauges (ready, pending, model info) must no longer count in the aggregate.
        directory = multiprocess_dir()
        if directory and process.pid is not None:
            prom_multiprocess.mark_process_dead(process.pid, directory)  # type: ignore[no-untyped-call]
