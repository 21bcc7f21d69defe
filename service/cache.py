"""One small key-value interface over Redis and an in-process LRU.

The service caches three things: a patient's timeline with its watermark, the scan state
at the end of that timeline, and CDS client JWT ids (``jti``) already seen. All three are
bytes with a time to live, and the jti check needs an atomic "set if absent". Redis gives
replicas one shared cache; without ``REDIS_URL`` the LRU serves one process.

If Redis stops answering, ``ResilientCache`` keeps the service answering from the LRU,
reports ``degraded`` (readiness details and a metric show it), and tries Redis again after
a pause. Keys never contain a raw patient id: callers build them with ``patient_key``.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections import OrderedDict
from collections.abc import Awaitable
from typing import Protocol, cast

import redis.asyncio as redis
from redis.exceptions import RedisError

from service import metrics


class Cache(Protocol):
    """Bytes by key, each with an optional time to live in seconds."""

    async def get(self, key: str) -> bytes | None: ...

    async def set(self, key: str, value: bytes, ttl: float | None = None) -> None: ...

    async def add(self, key: str, value: bytes, ttl: float) -> bool:
        """Store only if ``key`` is absent; True when this call stored it (atomic)."""
        ...


class CacheUnavailable(Exception):
    """The cache backend did not answer."""


def patient_key(secret: bytes, fhir_base: str, patient_id: str, kind: str) -> str:
    """A cache key for one patient on one FHIR server: an HMAC, so the id cannot be read
    back from the key nor found by hashing candidate ids without the secret."""
    digest = hmac.new(secret, f"{fhir_base}\x00{patient_id}".encode(), hashlib.sha256)
    return f"ehrmamba:{kind}:{digest.hexdigest()}"


class MemoryCache:
    """A bounded LRU in this process; expiry is checked on read."""

    def __init__(self, max_entries: int = 10_000) -> None:
        self.max_entries = max_entries
        self._items: OrderedDict[str, tuple[bytes, float | None]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    async def get(self, key: str) -> bytes | None:
        item = self._items.get(key)
        if item is None:
            return None
        value, expires = item
        if expires is not None and expires <= time.monotonic():
            del self._items[key]
            return None
        self._items.move_to_end(key)
        return value

    async def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        expires = time.monotonic() + ttl if ttl is not None else None
        self._items[key] = (value, expires)
        self._items.move_to_end(key)
        while len(self._items) > self.max_entries:
            self._items.popitem(last=False)

    async def add(self, key: str, value: bytes, ttl: float) -> bool:
        if await self.get(key) is not None:
            return False
        await self.set(key, value, ttl)
        return True


class RedisCache:
    """Redis with short socket timeouts, so a stalled server costs a request milliseconds,
    not seconds. Every backend failure surfaces as ``CacheUnavailable``."""

    def __init__(self, url: str, timeout: float = 0.25) -> None:
        self._redis = redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, retry_on_timeout=False
        )

    async def get(self, key: str) -> bytes | None:
        try:
            value = await self._redis.get(key)
        except (RedisError, OSError) as exc:
            raise CacheUnavailable(str(exc)) from exc
        return bytes(value) if value is not None else None

    async def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        try:
            await self._redis.set(key, value, px=int(ttl * 1000) if ttl is not None else None)
        except (RedisError, OSError) as exc:
            raise CacheUnavailable(str(exc)) from exc

    async def add(self, key: str, value: bytes, ttl: float) -> bool:
        try:
            stored = await self._redis.set(key, value, px=max(1, int(ttl * 1000)), nx=True)
        except (RedisError, OSError) as exc:
            raise CacheUnavailable(str(exc)) from exc
        return bool(stored)

    async def ping(self) -> None:
        try:
            await cast(Awaitable[bool], self._redis.ping())  # typed as sync-or-async
        except (RedisError, OSError) as exc:
            raise CacheUnavailable(str(exc)) from exc

    async def aclose(self) -> None:
        await self._redis.aclose()


class ResilientCache:
    """Redis when it answers, the in-process LRU when it does not.

    After a Redis failure the LRU serves for ``retry_after`` seconds, then Redis is tried
    again. ``degraded`` says whether the last Redis call failed. With no Redis configured
    this is just the LRU, and never degraded.
    """

    def __init__(
        self, remote: RedisCache | None, local: MemoryCache, retry_after: float = 5.0
    ) -> None:
        self.remote = remote
        self.local = local
        self.retry_after = retry_after
        self._down_until = 0.0

    @property
    def backend(self) -> str:
        return "redis" if self.remote is not None else "memory"

    @property
    def degraded(self) -> bool:
        return self.remote is not None and self._down_until > 0.0

    def _use_remote(self) -> RedisCache | None:
        if self.remote is None or time.monotonic() < self._down_until:
            return None
        return self.remote

    def _failed(self) -> None:
        metrics.CACHE_ERRORS.inc()
        metrics.CACHE_DEGRADED.set(1)
        self._down_until = time.monotonic() + self.retry_after

    def _recovered(self) -> None:
        if self._down_until:
            metrics.CACHE_DEGRADED.set(0)
        self._down_until = 0.0

    async def get(self, key: str) -> bytes | None:
        remote = self._use_remote()
        if remote is not None:
            try:
                value = await remote.get(key)
            except CacheUnavailable:
                self._failed()
            else:
                self._recovered()
                return value
        return await self.local.get(key)

    async def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        remote = self._use_remote()
        if remote is not None:
            try:
                await remote.set(key, value, ttl)
            except CacheUnavailable:
                self._failed()
            else:
                self._recovered()
                return
        await self.local.set(key, value, ttl)

    async def add(self, key: str, value: bytes, ttl: float) -> bool:
        remote = self._use_remote()
        if remote is not None:
            try:
                stored = await remote.add(key, value, ttl)
            except CacheUnavailable:
                self._failed()
            else:
                self._recovered()
                # Also remember it here, so a jti seen while Redis was up is still refused
                # by this process if Redis goes away within its lifetime.
                await self.local.add(key, value, ttl)
                return stored
        return await self.local.add(key, value, ttl)

    async def check(self) -> str:
        """Readiness detail: ``memory``, ``redis`` or ``redis unavailable (...)``."""
        if self.remote is None:
            return "memory"
        try:
            await self.remote.ping()
        except CacheUnavailable as exc:
            self._failed()
            return f"redis unavailable, serving from process memory ({exc})"
        self._recovered()
        return "redis"

    async def aclose(self) -> None:
        if self.remote is not None:
            await self.remote.aclose()
