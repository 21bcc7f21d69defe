"""Micro-batching: concurrent requests share one engine call.

On a CPU a batch of 8 patients costs far less than 8 calls (the weights are read once per
step for all of them), so requests that arrive within ``max_wait`` of each other are scored
together, up to ``max_size`` at a time, by one worker thread. It waits only while other
requests are in progress that could still join (``in_progress``): a lone request does not
sit out ``max_wait`` for company that cannot come. The queue is bounded: when
``queue_max`` requests already wait, a new one is refused at once (the route answers 429
with ``Retry-After``) instead of joining a queue whose tail would time out anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import anyio

from service import metrics

In = TypeVar("In")
Out = TypeVar("Out")


class QueueFull(Exception):
    """Too many requests are already waiting for the engine."""


@dataclass
class _Job(Generic[In, Out]):
    item: In
    future: asyncio.Future[Out]
    queued: float = field(default_factory=time.perf_counter)


class MicroBatcher(Generic[In, Out]):
    """Runs ``run(batch) -> answers`` (blocking, one answer per item, in order) in a worker
    thread on batches gathered from concurrent ``submit`` calls."""

    def __init__(
        self,
        run: Callable[[Sequence[In]], list[Out]],
        *,
        max_size: int,
        max_wait: float,
        queue_max: int,
        in_progress: Callable[[], int] | None = None,
    ) -> None:
        """``in_progress``: requests the service is working on now (those in the queue
        and those still reading FHIR); None: always wait up to ``max_wait``."""
        self._run = run
        self._in_progress = in_progress
        self.max_size = max_size
        self.max_wait = max_wait
        self.queue_max = queue_max
        self._queue: asyncio.Queue[_Job[In, Out]] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._serve())

    async def stop(self) -> None:
        """Finish nothing new: cancel the worker and fail whatever still waits."""
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        while not self._queue.empty():
            job = self._queue.get_nowait()
            if not job.future.done():
                job.future.set_exception(QueueFull("the service is shutting down"))

    async def submit(self, item: In) -> Out:
        """The answer for ``item``; QueueFull at once when the queue is full."""
        if self._worker is None:
            raise RuntimeError("MicroBatcher.start() was not called")
        if self._queue.qsize() >= self.queue_max:
            metrics.QUEUE_REJECTIONS.labels("full").inc()
            raise QueueFull(f"{self.queue_max} requests are already waiting")
        job: _Job[In, Out] = _Job(item, asyncio.get_running_loop().create_future())
        self._queue.put_nowait(job)
        metrics.QUEUE_DEPTH.inc()
        return await job.future

    async def _serve(self) -> None:
        while True:
            batch = [await self._queue.get()]
            deadline = time.perf_counter() + self.max_wait
            while len(batch) < self.max_size:
                if self._queue.empty() and not self._company_possible(len(batch)):
                    break
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    if self._queue.empty():
                        break
                    batch.append(self._queue.get_nowait())
                    continue
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except TimeoutError:
                    break
            metrics.QUEUE_DEPTH.dec(len(batch))
            await self._score(batch)

    def _company_possible(self, batched: int) -> bool:
        """Whether a request not yet queued could still join this batch."""
        return self._in_progress is None or self._in_progress() > batched

    async def _score(self, batch: list[_Job[In, Out]]) -> None:
        started = time.perf_counter()
        live = [job for job in batch if not job.future.done()]  # caller gone: skip it
        for job in live:
            metrics.QUEUE_WAIT.observe(started - job.queued)
        if not live:
            return
        metrics.BATCH_SIZE.observe(len(live))
        try:
            answers = await anyio.to_thread.run_sync(self._run, [job.item for job in live])
        except Exception as exc:  # every waiting caller gets the engine's error
            for job in live:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        for job, answer in zip(live, answers, strict=True):
            if not job.future.done():
                job.future.set_result(answer)
