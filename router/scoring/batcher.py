"""Micro-batching: concurrent requests for one model scored by one ``predict`` call.

``predict`` costs about the same for 1 row as for 32 (pyfunc's schema work and sklearn's input
validation dominate, not arithmetic), so under concurrency the model's time is shared out.

One :class:`MicroBatcher` per loaded model, living on the event loop, behind one call:
``await batcher.predict(data, params)``. Whether a request is batched is the batcher's rule
alone: checked :class:`~router.input.rows.Rows` without ``params``, fewer than ``max_rows``, for a
model whose rows are scored independently (``enabled``, see ``router/scoring/modelkind.py``);
everything else is one model call of its own. Batched requests queue; one collector per model
takes what is queued (up to ``max_rows`` rows, rows of one ``key`` only), joins it, builds the
model's input ONCE for the call (``prepare``: a DataFrame, or a 2-D array where proven equal), runs
``predict`` through ``run`` (the arm's threads) and splits the output back by row counts. No request
builds a pandas object of its own. A request arriving while
the model is idle is scored at once; while a call runs, the next batch forms behind it. The
collector waits up to ``wait_s`` for more only while ``pending()`` says requests for this model
are still being parsed: a lone request never waits.

A failing batch is re-scored one request at a time (each request at most once more), so a bad row
fails its own request only; an output whose length is not the batch's row count turns batching
off for the model (rows are evidently not independent) and its requests are scored alone.
The index a client sent (``dataframe_split``'s ``index``) is what the model sees for its rows.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import pandas as pd

from router.input.rows import Rows

log = logging.getLogger(__name__)

T = TypeVar("T")
Predict = Callable[[Any, "dict[str, Any] | None"], Any]
Runner = Callable[[Callable[[], Any]], Awaitable[Any]]
BatchObserver = Callable[[int], None]
Prepare = Callable[[Rows], Any]


@dataclass(frozen=True)
class BatchScore:
    """One request's slice of a model call: the output rows and the call's own duration."""

    prediction: Any
    latency_s: float
    batch_rows: int  # rows in the model call that produced it (1 request alone: its own rows)


@dataclass
class _Item:
    rows: Rows
    future: asyncio.Future[BatchScore] = field(repr=False)

    @property
    def n_rows(self) -> int:
        return self.rows.n_rows


async def _in_thread(fn: Callable[[], T]) -> T:
    return await asyncio.to_thread(fn)


def _no_pending() -> int:
    return 0


def split_output(output: Any, counts: list[int]) -> list[Any] | None:
    """``output`` cut into consecutive pieces of ``counts`` rows, or None if not one per row.

    A frame or series output keeps the index the model gave each row, except a fresh
    ``RangeIndex`` over the whole batch, which restarts at 0 per piece as it would alone.
    """
    total = sum(counts)
    bounds = np.cumsum([0, *counts]).tolist()
    if isinstance(output, pd.DataFrame | pd.Series):
        if len(output) != total:
            return None
        fresh = isinstance(output.index, pd.RangeIndex) and output.index.start == 0
        pieces = [output.iloc[a:b] for a, b in itertools.pairwise(bounds)]
        return [p.reset_index(drop=True) for p in pieces] if fresh else pieces
    if isinstance(output, np.ndarray):
        if output.ndim == 0 or output.shape[0] != total:
            return None
    elif not isinstance(output, list) or len(output) != total:
        return None
    return [output[a:b] for a, b in itertools.pairwise(bounds)]


class MicroBatcher:
    """Scores one model's requests, combining concurrent small ones into shared calls."""

    def __init__(
        self,
        predict: Predict,
        *,
        max_rows: int,
        wait_s: float,
        run: Runner = _in_thread,
        enabled: bool = True,
        prepare: Prepare = Rows.frame,
        pending: Callable[[], int] = _no_pending,
        on_batch: BatchObserver | None = None,
        name: str = "model",
    ) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self._predict = predict
        self._max_rows = max_rows
        self._wait_s = max(0.0, wait_s)
        self._run = run
        self._prepare = prepare
        self._pending = pending
        self._on_batch = on_batch
        self._name = name
        self._queue: list[_Item] = []
        self._collector: asyncio.Task[None] | None = None
        self._wake: asyncio.Future[None] | None = None
        self.enabled = enabled and max_rows > 1

    # -- the one call ---------------------------------------------------------------------------
    async def predict(self, data: Any, params: dict[str, Any] | None = None) -> BatchScore:
        """Score ``data`` (checked :class:`Rows`, or what ``predict`` takes as it is), with
        concurrent requests where that is safe; raises what ``predict`` raised for this request's
        rows (alone)."""
        if (
            not self.enabled
            or params
            or not isinstance(data, Rows)
            or data.n_rows >= self._max_rows
        ):
            output, latency_s = await self._run(lambda: self._timed(data, params))
            self._observe(_rows(data))
            return BatchScore(output, latency_s, _rows(data))
        loop = asyncio.get_running_loop()
        item = _Item(data, loop.create_future())
        self._queue.append(item)
        self._poke()
        if self._collector is None:
            self._collector = loop.create_task(self._collect(), name=f"batcher-{self._name}")
        return await item.future

    def poke(self) -> None:
        """A request for this model stopped being pending without submitting (bad input)."""
        self._poke()

    @property
    def idle(self) -> bool:
        return self._collector is None and not self._queue

    # -- the collector --------------------------------------------------------------------------
    def _poke(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    def _queued_rows(self) -> int:
        return sum(item.n_rows for item in self._queue)

    async def _gather(self) -> None:
        """Wait for requests still being parsed, at most ``wait_s``, never for a lone one."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._wait_s
        while self._pending() > 0 and self._queued_rows() < self._max_rows:
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
        batch, rest, rows = [head], [], head.n_rows
        for item in self._queue[1:]:
            if item.rows.key == head.rows.key and rows + item.n_rows <= self._max_rows:
                batch.append(item)
                rows += item.n_rows
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
        data = Rows.join([item.rows for item in batch])
        rows = data.n_rows
        try:
            output, latency_s = await self._run(lambda: self._timed(data, None))
        except Exception as exc:  # noqa: BLE001 - a model may raise anything: isolated per request
            log.info("batch of %d requests failed (%r): scoring them one by one", len(batch), exc)
            await self._score_each(batch)
            return
        pieces = split_output(output, [item.n_rows for item in batch])
        if pieces is None:
            log.warning(
                "%s: output of length %s for %d input rows: not batchable, scoring requests alone",
                self._name,
                _length(output),
                rows,
            )
            self.enabled = False
            await self._score_each(batch)
            return
        self._observe(rows)
        for item, piece in zip(batch, pieces, strict=True):
            _settle(item.future, BatchScore(piece, latency_s, rows))

    async def _score_each(self, batch: list[_Item]) -> None:
        for item in batch:
            await self._score_alone(item)

    async def _score_alone(self, item: _Item) -> None:
        if item.future.done():  # its request went away (timed out or disconnected)
            return
        try:
            output, latency_s = await self._run(lambda: self._timed(item.rows, None))
        except Exception as exc:  # noqa: BLE001 - the request's own failure, handed to it
            if not item.future.done():
                item.future.set_exception(exc)
            return
        self._observe(item.n_rows)
        _settle(item.future, BatchScore(output, latency_s, item.n_rows))

    def _timed(self, data: Any, params: dict[str, Any] | None) -> tuple[Any, float]:
        """The model's answer and the duration of its call (not of building its input)."""
        model_input = self._prepare(data) if isinstance(data, Rows) else data
        start = time.perf_counter()
        output = self._predict(model_input, params)
        return output, time.perf_counter() - start

    def _observe(self, rows: int) -> None:
        if self._on_batch is not None:
            self._on_batch(rows)


def _rows(data: Any) -> int:
    if isinstance(data, Rows):
        return data.n_rows
    try:
        return len(data)
    except TypeError:
        return 1


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
