"""A hard time bound for synchronous code under test: a reader stuck in a loop fails the
test instead of hanging the suite (hypothesis's deadline only judges examples that end)."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType


class Hung(Exception):
    """The code under test ran past its bound."""


@contextmanager
def within(seconds: float) -> Iterator[None]:
    """Raise ``Hung`` in the main thread if the block runs longer than ``seconds``."""

    def expire(signum: int, frame: FrameType | None) -> None:
        raise Hung(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
