"""One arm's scoring capacity: its own threads, so nothing another arm does can take them.

A :class:`Bulkhead` runs a model's ``predict`` calls on at most ``threads`` daemon threads of its
own. A call that outlives its caller's timeout cannot be killed (Python has no way to stop a
thread): its thread keeps its slot until the model returns. So at most ``threads`` hung calls can
pile up per arm, and once every slot is held by one, new calls wait for a slot (and time out in
the caller) instead of starting more threads. The threads are daemons so that a hung model never
blocks the process from exiting. Idle threads retire by themselves, so the threads of a model
taken out of service go away once its last call has returned.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_Job = tuple[Callable[[], Any], asyncio.Future[Any], asyncio.AbstractEventLoop]
IDLE_S = 30.0  # an idle thread retires after this long (a new one starts on demand)


class Bulkhead:
    """Runs blocking calls on ``threads`` threads owned by one arm (see the module docstring)."""

    def __init__(self, name: str, threads: int) -> None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.name = name
        self.threads = threads
        self._slots: asyncio.Semaphore | None = None
        self._jobs: queue.Queue[_Job] = queue.Queue()
        self._workers: list[threading.Thread] = []
        self._lock = threading.Lock()
        self.busy = 0  # calls running in a thread now (a hung one included); loop thread only

    async def run(self, fn: Callable[[], T]) -> T:
        """``fn()`` in one of this bulkhead's threads; waits for a free slot first.

        Cancelling the caller (a timeout) abandons the call: its result is dropped, and its slot
        is given back only when ``fn`` returns.
        """
        loop = asyncio.get_running_loop()
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.threads)
        await self._slots.acquire()
        self.busy += 1
        future: asyncio.Future[T] = loop.create_future()
        self._jobs.put((fn, future, loop))
        self._start_worker()  # after the put: an idle worker about to retire sees the job
        return await future

    def _start_worker(self) -> None:
        with self._lock:
            # One thread per outstanding call at most (a job is queued only while a slot is
            # held), so an idle worker exists for every queued job.
            if len(self._workers) < min(self.busy, self.threads):
                worker = threading.Thread(
                    target=self._work, name=f"predict-{self.name}", daemon=True
                )
                self._workers.append(worker)
                worker.start()

    def _work(self) -> None:
        me = threading.current_thread()
        while True:
            try:
                fn, future, loop = self._jobs.get(timeout=IDLE_S)
            except queue.Empty:
                with self._lock:
                    if self._jobs.empty():  # retire (a reload's old arm, or a quiet spell)
                        self._workers.remove(me)
                        return
                continue
            try:
                result: Any = fn()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller, whatever it is
                self._settle(loop, future, None, exc)
            else:
                self._settle(loop, future, result, None)

    def _settle(
        self,
        loop: asyncio.AbstractEventLoop,
        future: asyncio.Future[Any],
        result: Any,
        exc: BaseException | None,
    ) -> None:
        def settle() -> None:
            self.busy -= 1
            if self._slots is not None:
                self._slots.release()
            if future.done():  # the caller gave up (timeout): nobody wants the answer
                return
            if exc is None:
                future.set_result(result)
            else:
                future.set_exception(exc)

        # A closed loop (shutdown): nobody is waiting any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle)
