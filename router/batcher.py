"""Micro-batching: concurrent requests for one model scored by one ``predict`` call.

``predict`` costs about the same for 1 row as for 32 (pyfunc's schema work and sklearn's input
validation dominate, not arithmetic), so under concurrency the model's time is shared out.

One :class:`MicroBatcher` per loaded model, living on the event loop. Requests ``submit`` a
DataFrame; a collector takes what is queued (up to ``max_rows`` rows, frames of the same columns
and dtypes only), concatenates it, runs ``predict`` once through ``run`` (a worker thread) and
splits the output back by row counts. It waits up to ``wait_s`` for more only while requests
announced with :meth:`expect` have not yet submitted (they are being parsed): a lone request
never waits. A failing batch, or an output whose length is not the batch's row count, is
re-scored one request at a time, so a bad row fails its own request only; after a length
mismatch the model is marked unbatchable (:attr:`batchable`), and callers score it alone.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

T = TypeVar("T")
Predict = Callable[[pd.DataFrame], Any]
Runner = Callable[[Callable[[], Any]], Awaitable[Any]]
BatchObserver = Callable[[int], None]


@dataclass(frozen=True)
class BatchScore:
    """One request's slice of a model call: the output rows and the call's own duration."""

    prediction: Any
    latency_s: float
    batch_rows: int  # rows in the model call that produced it (1 request alone: its own rows)


@dataclass
class _Item:
    frame: pd.DataFrame
    key: Hashable
    future: asyncio.Future[BatchScore] = field(repr=False)

    @property
    def rows(self) -> int:
        return len(self.frame)


async def _in_thread(fn: Callable[[], T]) -> T:
    return await asyncio.to_thread(fn)


def frame_key(frame: pd.DataFrame) -> Hashable:
    """Frames concatenate without changing any column's dtype only when these are equal."""
    return tuple(frame.columns), tuple(str(dtype) for dtype in frame.dtypes)


def split_output(output: Any, counts: list[int]) -> list[Any] | None:
    """``output`` cut into consecutive pieces of ``counts`` rows, or None if not one per row."""
    total = sum(counts)
    if isinstance(output, pd.DataFrame | pd.Series):
        if len(output) != total:
            return None
        output = output.reset_index(drop=True)
        bounds = np.cumsum([0, *counts]).tolist()
        return [output.iloc[a:b].reset_index(drop=True) for a, b in itertools.pairwise(bounds)]
    if isinstance(output, np.ndarray):
        if output.ndim == 0 or output.shape[0] != total:
            return None
    elif not isinstance(output, list) or len(output) != total:
        return None
    bounds = np.cumsum([0, *counts]).tolist()
    return [output[a:b] for a, b in itertools.pairwise(bounds)]


class MicroBatcher:
    """Combines concurrent ``submit`` calls for one model into shared ``predict`` calls."""

    def __init__(
        self,
        predict: Predict,
        *,
        max_rows: int,
        wait_s: float,
        run: Runner = _in_thread,
        on_batch: BatchObserver | None = None,
        name: str = "model",
    ) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self._predict = predict
        self._max_rows = max_rows
        self._wait_s = max(0.0, wait_s)
        self._run = run
        self._on_batch = on_batch
        self._name = name
        self._queue: list[_Item] = []
        self._collector: asyncio.Task[None] | None = None
        self._wake: asyncio.Future[None] | None = None
        self.batchable = True
        self.expected = 0  # announced requests that have not submitted (or withdrawn) yet
        self.active = 0  # requests for this model anywhere in the router (callers count them)

    # -- the requests' side ---------------------------------------------------------------------
    def expect(self) -> None:
        """A request will probably submit soon: a batch may wait (briefly) to include it."""
        self.expected += 1

    def withdraw(self) -> None:
        """An announced request will not submit after all (bad input, scored alone)."""
        self.expected = max(0, self.expected - 1)
        self._poke()

    async def submit(self, frame: pd.DataFrame, *, expected: bool = False) -> BatchScore:
        """Score ``frame`` (possibly with others); raises what ``predict`` raised for it alone.

        ``expected=True`` when this request announced itself with :meth:`expect`.
        """
        loop = asyncio.get_running_loop()
        if expected:
            self.expected = max(0, self.expected - 1)
        item = _Item(frame, frame_key(frame), loop.create_future())
        self._queue.append(item)
        self._poke()
        if self._collector is None:
            self._collector = loop.create_task(self._collect(), name=f"batcher-{self._name}")
        return await item.future

    @property
    def idle(self) -> bool:
        return self._collector is None and not self._queue

    # -- the collector --------------------------------------------------------------------------
    def _poke(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    def _queued_rows(self) -> int:
        return sum(item.rows for item in self._queue)

    async def _gather(self) -> None:
        """Wait for announced requests, at most ``wait_s``, never for a lone one."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._wait_s
        while self.expected > 0 and self._queued_rows() < self._max_rows:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            wake: asyncio.Future[None] = loop.create_future()
            self._wake = wake
            timer = loop.call_later(remaining, _resolve, wake)
            try:
                await wake
            finally:
                timer.cancel()
                self._wake = None

    def _take(self) -> list[_Item]:
        """The head of the queue and what fits with it (same key, up to ``max_rows`` rows)."""
        self._queue = [item for item in self._queue if not item.future.done()]
        if not self._queue:
            return []
        head = self._queue[0]
        batch, rest, rows = [head], [], head.rows
        for item in self._queue[1:]:
            if item.key == head.key and rows + item.rows <= self._max_rows:
                batch.append(item)
                rows += item.rows
            else:
                rest.append(item)
        self._queue = rest
        return batch

    async def _collect(self) -> None:
        batch: list[_Item] = []
        try:
            while self._queue:
                await self._gather()
                batch = self._take()
                if batch:
                    await self._score(batch)
                batch = []
        except BaseException as exc:  # a bug or cancellation: no request may wait forever
            for item in [*batch, *self._queue]:
                if item.future.done():
                    continue
                if isinstance(exc, asyncio.CancelledError):
                    item.future.cancel()
                else:
                    item.future.set_exception(exc)
            self._queue = []
            raise
        finally:
            self._collector = None

    async def _score(self, batch: list[_Item]) -> None:
        if len(batch) == 1:
            await self._score_alone(batch[0])
            return
        frame = pd.concat([item.frame for item in batch], ignore_index=True)
        try:
            output, latency_s = await self._run(lambda: self._timed(frame))
        except Exception as exc:  # noqa: BLE001 - a model may raise anything: isolated per request
            log.info("batch of %d requests failed (%r): scoring them one by one", len(batch), exc)
            await self._score_each(batch)
            return
        pieces = split_output(output, [item.rows for item in batch])
        if pieces is None:
            log.warning(
                "%s: output of length %s for %d input rows: not batchable, scoring requests alone",
                self._name,
                _length(output),
                len(frame),
            )
            self.batchable = False
            await self._score_each(batch)
            return
        self._observe(len(frame))
        for item, piece in zip(batch, pieces, strict=True):
            _settle(item.future, BatchScore(piece, latency_s, len(frame)))

    async def _score_each(self, batch: list[_Item]) -> None:
        for item in batch:
            await self._score_alone(item)

    async def _score_alone(self, item: _Item) -> None:
        if item.future.done():  # its request went away
            return
        try:
            output, latency_s = await self._run(lambda: self._timed(item.frame))
        except Exception as exc:  # noqa: BLE001 - the request's own failure, handed to it
            if not item.future.done():
                item.future.set_exception(exc)
            return
        self._observe(item.rows)
        _settle(item.future, BatchScore(output, latency_s, item.rows))

    def _timed(self, frame: pd.DataFrame) -> tuple[Any, float]:
        start = time.perf_counter()
        output = self._predict(frame)
        return output, time.perf_counter() - start

    def _observe(self, rows: int) -> None:
        if self._on_batch is not None:
            self._on_batch(rows)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _settle(future: asyncio.Future[BatchScore], score: BatchScore) -> None:
    if not future.done():
        future.set_result(score)


def _length(output: Any) -> str:
    try:
        return str(len(output))
    except TypeError:
        return "(none)"
