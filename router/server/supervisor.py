"""``--workers N``: a supervisor process and N uvicorn workers, one listening socket per worker.

Why not uvicorn's own multiprocess mode: it binds one socket without ``IPPROTO_TCP``, so asyncio
never sets ``TCP_NODELAY`` on accepted connections and each keep-alive response waits for the
client's delayed ACK (~40 ms); and the workers share that one socket, so a pooled client's
connections all land on whichever worker happened to accept first. Here the supervisor binds one
``SO_REUSEPORT`` socket per worker (TCP explicitly): the kernel spreads new connections across them.

Process hygiene: a worker dies with its supervisor (``PR_SET_PDEATHSIG`` on Linux, else a thread
polling ``getppid``), shutting down gracefully on the SIGTERM it gets; the port is checked free
before binding, so a second router (or an orphaned worker) is an explicit "address in use", never a
silent share of the port; ``SO_REUSEADDR`` lets a restart after a crash bind despite TIME_WAIT.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import sys
import threading
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


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP listening socket that shares ``host:port`` with the other workers' sockets.

    ``IPPROTO_TCP`` explicitly: asyncio sets ``TCP_NODELAY`` on accepted connections only when the
    listening socket says it is TCP.
    """
    family, address = _address(host, port)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        sock.listen(LISTEN_BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


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
    """uvicorn's worker process on its own listening socket."""

    def __init__(self, config: Config, sock: socket.socket) -> None:
        super().__init__(config, [sock])
        self.supervisor_pid = os.getpid()  # pickled with the target when the process starts

    def target(self, sockets: list[socket.socket] | None = None) -> None:  # pragma: no cover
        die_with_parent(self.supervisor_pid)
        super().target(sockets)


class Supervisor:
    """Runs ``workers`` copies of the app described by ``config``; restarts a worker that dies."""

    def __init__(self, config: Config, workers: int) -> None:
        self.config = config
        self.workers = workers
        self._stop = threading.Event()
        self._status = 0

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._stop.set()

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; return the exit status (0 after a graceful stop)."""
        host = self.config.host
        try:
            port = claim_port(host, self.config.port)
            sockets = [listening_socket(host, port) for _ in range(self.workers)]
        except OSError as exc:
            log.error("cannot listen on %s:%s: %s", host, self.config.port, exc.strerror or exc)
            return 1
        for handled in (signal.SIGTERM, signal.SIGINT):
            signal.signal(handled, self._on_signal)
        log.info("supervisor %d: %d workers on %s:%d", os.getpid(), self.workers, host, port)
        processes: list[Process] = [self._start(sock) for sock in sockets]
        try:
            while not self._stop.wait(CHECK_INTERVAL_S):
                for i, process in enumerate(processes):
                    # Only a worker that exited is replaced. A health-check timeout is no proof of a
                    # hang on a starved machine, and killing a live worker loses its queued log.
                    if process.exitcode is not None:
                        processes[i] = self._replace(process, sockets[i])
        finally:
            # New connections are refused from here on, not queued behind a stopping worker.
            for sock in sockets:
                sock.close()
            for process in processes:
                process.terminate()
            for process in processes:
                process.join()
                self._forget(process)
        log.info("supervisor %d: stopped", os.getpid())
        return self._status

    def _start(self, sock: socket.socket) -> Worker:
        worker = Worker(self.config, sock)
        worker.start()
        log.info("worker %s started", worker.pid)
        return worker

    def _replace(self, process: Process, sock: socket.socket) -> Process:
        process.join()
        self._forget(process)
        if process.exitcode == STARTUP_FAILURE:
            # The app cannot start (bad config, broken import): restarting would fail the same way.
            log.error("worker %s failed to start; stopping", process.pid)
            self._status = STARTUP_FAILURE
            self._stop.set()
            return process
        log.error("worker %s died (exit %s); starting a new one", process.pid, process.exitcode)
        return self._start(sock)

    @staticmethod
    def _forget(process: Process) -> None:
        # Its live gauges (ready, pending, model info) must no longer count in the aggregate.
        directory = multiprocess_dir()
        if directory and process.pid is not None:
            prom_multiprocess.mark_process_dead(process.pid, directory)  # type: ignore[no-untyped-call]
