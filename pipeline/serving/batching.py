"""Dynamic batching for one resident model version (Triton's semantics).

Requests (``n`` rows each) wait in a queue. The worker takes the first waiting request, then keeps
adding requests while the batch has room (``max_batch_size`` rows) until ``max_queue_delay_ms``
have passed since that first request was enqueued, or the batch is full; it runs ONE forward in an
executor thread (torch releases the GIL) and splits the output rows back to the requests. A
request is never split across batches; one bigger than ``max_batch_size`` is refused by the caller
(input validation). While a forward runs, the next batch collects. Requests whose caller gave up
(cancelled) are skipped. ``queue_limit`` bounds the requests waiting here: past it ``submit``
raises :class:`QueueFull` at once.

This module knows nothing about models or versions: ``run(batch) -> outputs`` is any function
from one stacked ``np.ndarray`` to one with the same number of rows.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor

import numpy as np


class QueueFull(Exception):
    """More requests waiting than ``queue_limit``."""


class BatcherClosed(Exception):
    """The batcher was closed before the request ran."""


class _Pending:
    __slots__ = ("x", "fut", "t")

    def __init__(self, x: np.ndarray, fut: asyncio.Future, t: float):
        self.x, self.fut, self.t = x, fut, t


class DynamicBatcher:
    def __init__(
        self,
        run: Callable[[np.ndarray], np.ndarray],
        *,
        max_batch_size: int,
        max_queue_delay_ms: float,
        queue_limit: int,
        executor: Executor | None = None,
        on_batch: Callable[[int, list[float]], None] | None = None,
    ):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.run = run
        self.max_batch_size = max_batch_size
        self.delay_s = max(0.0, max_queue_delay_ms) / 1e3
        self.queue_limit = queue_limit
        self.executor = executor
        self.on_batch = on_batch  # (rows, queue waits in seconds) after each forward
        self._q: deque[_Pending] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closed = False
        self.batches = 0
        self.rows = 0

    @property
    def depth(self) -> int:
        return len(self._q)

    async def submit(self, x: np.ndarray) -> np.ndarray:
        if self._closed:
            raise BatcherClosed("batcher closed")
        if len(self._q) >= self.queue_limit:
            raise QueueFull(f"{len(self._q)} requests already waiting (queue_limit {self.queue_limit})")
        loop = asyncio.get_running_loop()
        if self._task is None:
            self._task = loop.create_task(self._worker(), name="forgeline-batcher")
        p = _Pending(x, loop.create_future(), time.perf_counter())
        self._q.append(p)
        self._wake.set()
        return await p.fut

    def _take(self) -> list[_Pending]:
        batch, rows = [], 0
        while self._q:
            p = self._q[0]
            if p.fut.done():  # the caller gave up
                self._q.popleft()
                continue
            n = p.x.shape[0]
            if batch and rows + n > self.max_batch_size:
                break
            batch.append(self._q.popleft())
            rows += n
            if rows >= self.max_batch_size:
                break
        return batch

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._q:
                self._wake.clear()
                await self._wake.wait()
            first = self._q[0]
            # wait for more rows until the first request's delay has passed or the batch is full
            while True:
                rows = sum(p.x.shape[0] for p in self._q if not p.fut.done())
                left = first.t + self.delay_s - time.perf_counter()
                if rows >= self.max_batch_size or left <= 0:
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), left)
                except asyncio.TimeoutError:
                    break
            batch = self._take()
            if not batch:
                continue
            t_start = time.perf_counter()
            xs = [p.x for p in batch]
            try:
                stacked = xs[0] if len(xs) == 1 else np.concatenate(xs, axis=0)
                out = await loop.run_in_executor(self.executor, self.run, stacked)
                if out.shape[0] != stacked.shape[0]:
                    raise RuntimeError(f"the model returned {out.shape[0]} rows for a batch of {stacked.shape[0]}")
            except BaseException as e:  # noqa: BLE001 - every waiter gets the error
                for p in batch:
                    if not p.fut.done():
                        p.fut.set_exception(e if isinstance(e, Exception) else RuntimeError(repr(e)))
                if isinstance(e, asyncio.CancelledError):
                    raise
                continue
            self.batches += 1
            self.rows += stacked.shape[0]
            i = 0
            for p in batch:
                n = p.x.shape[0]
                if not p.fut.done():
                    p.fut.set_result(out[i : i + n])
                i += n
            if self.on_batch is not None:
                self.on_batch(int(stacked.shape[0]), [t_start - p.t for p in batch])

    async def close(self) -> None:
        """Stop the worker; requests still queued fail with :class:`BatcherClosed`."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
            self._task = None
        while self._q:
            p = self._q.popleft()
            if not p.fut.done():
                p.fut.set_exception(BatcherClosed("batcher closed"))


__all__ = ["BatcherClosed", "DynamicBatcher", "QueueFull"]
