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
