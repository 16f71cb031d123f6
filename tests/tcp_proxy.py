"""A TCP proxy on 127.0.0.1 that a test can cut and restore: a dependency that goes away (every
connection reset, new ones refused) and comes back on the same port. Real sockets, no mocks."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class TcpProxy:
    """Forwards ``127.0.0.1:port`` to ``target``; ``down()`` / ``up()`` switch it."""

    def __init__(self, target: tuple[str, int], port: int = 0) -> None:
        self.target = target
        self.port = port
        self._listener: socket.socket | None = None
        self._links: set[socket.socket] = set()
        self._lock = threading.Lock()

    def up(self) -> None:
        """Listen (again) on the same port and forward every new connection."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        """Refuse new connections and reset every open one, as a crashed server would."""
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            links, self._links = self._links, set()
        for sock in links:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by down()
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                self._links.update((client, server))
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass  # reset by down() or by either end
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            with self._lock:
                self._links.difference_update((source, sink))
            source.close()  # the other direction's thread closes ``sink``


@contextmanager
def tcp_proxy(target: tuple[str, int], *, start_up: bool = True) -> Iterator[TcpProxy]:
    """A proxy to ``target`` (up unless ``start_up`` is False: then its port is reserved and
    refuses connections until ``up()``); down at the end."""
    proxy = TcpProxy(target)
    proxy.up()  # picks a free port
    if not start_up:
        proxy.down()  # now refusing; ``up()`` takes the same port again
    try:
        yield proxy
    finally:
        proxy.down()
