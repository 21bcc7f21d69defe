"""The micro-batcher: concurrent requests share engine calls, answers go back to their own
callers, a full queue refuses at once, and an engine error reaches every waiting caller."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import pytest

from service.batching import MicroBatcher, QueueFull


class Recorder:
    """A stand-in engine that records the batches it was given (the batcher's contract is
    'one call per batch, answers in order'; the real engine's batching is tested in
    tests/model)."""

    def __init__(self, delay: float = 0.0) -> None:
        self.batches: list[list[int]] = []
        self.delay = delay
        self.release = threading.Event()
        self.release.set()

    def __call__(self, items: Sequence[int]) -> list[int]:
        self.release.wait(5)
        self.batches.append(list(items))
        if any(i < 0 for i in items):
            raise ValueError("negative input")
        return [i * 10 for i in items]


async def test_concurrent_requests_share_calls_and_get_their_own_answers() -> None:
    engine = Recorder()
    batcher = MicroBatcher(engine, max_size=8, max_wait=0.05, queue_max=100)
    batcher.start()
    try:
        answers = await asyncio.gather(*(batcher.submit(i) for i in range(20)))
    finally:
        await batcher.stop()
    assert answers == [i * 10 for i in range(20)]
    assert sorted(i for b in engine.batches for i in b) == list(range(20))
    assert max(len(b) for b in engine.batches) == 8
    assert len(engine.batches) <= 4  # 20 requests in batches of up to 8, not 20 calls


async def test_a_full_queue_refuses_at_once_and_recovers() -> None:
    engine = Recorder()
    engine.release.clear()  # the engine is busy: nothing leaves the queue
    batcher = MicroBatcher(engine, max_size=1, max_wait=0.0, queue_max=3)
    batcher.start()
    try:
        first = asyncio.ensure_future(batcher.submit(1))  # taken by the worker, blocks
        await asyncio.sleep(0.05)
        waiting = [asyncio.ensure_future(batcher.submit(i)) for i in (2, 3, 4)]
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFull):
            await batcher.submit(5)
        engine.release.set()
        assert await first == 10
        assert await asyncio.gather(*waiting) == [20, 30, 40]
        assert await batcher.submit(6) == 60  # room again
    finally:
        engine.release.set()
        await batcher.stop()


async def test_an_engine_error_reaches_every_caller_of_that_batch() -> None:
    engine = Recorder()
    batcher = MicroBatcher(engine, max_size=4, max_wait=0.05, queue_max=10)
    batcher.start()
    try:
        results = await asyncio.gather(
            batcher.submit(1), batcher.submit(-1), return_exceptions=True
        )
        assert all(isinstance(r, ValueError) for r in results)
        assert await batcher.submit(2) == 20  # the worker survived
    finally:
        await batcher.stop()


async def test_a_cancelled_caller_is_skipped() -> None:
    engine = Recorder()
    engine.release.clear()
    batcher = MicroBatcher(engine, max_size=1, max_wait=0.0, queue_max=10)
    batcher.start()
    try:
        busy = asyncio.ensure_future(batcher.submit(1))
        await asyncio.sleep(0.05)
        gone = asyncio.ensure_future(batcher.submit(2))
        await asyncio.sleep(0.01)
        gone.cancel()
        engine.release.set()
        assert await busy == 10
        assert await batcher.submit(3) == 30
        assert [2] not in engine.batches
    finally:
        engine.release.set()
        await batcher.stop()


async def test_a_lone_request_does_not_wait_for_company_that_cannot_come() -> None:
    engine = Recorder()
    in_progress = 1
    batcher = MicroBatcher(engine, max_size=8, max_wait=60.0, queue_max=8,
                           in_progress=lambda: in_progress)  # fmt: skip
    batcher.start()
    try:
        # Alone: answered long before the 60 s window would end.
        assert await asyncio.wait_for(batcher.submit(1), 10) == 10
        # Another request in progress (still reading FHIR, say): the batch waits for it.
        in_progress = 2
        first = asyncio.ensure_future(batcher.submit(2))
        await asyncio.sleep(0.2)
        assert not first.done(), "it waits while company may still come"
        second = asyncio.ensure_future(batcher.submit(3))
        assert list(await asyncio.wait_for(asyncio.gather(first, second), 10)) == [20, 30]
        assert engine.batches == [[1], [2, 3]]
    finally:
        await batcher.stop()
