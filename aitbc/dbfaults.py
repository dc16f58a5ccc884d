"""What a store does when its database fails under it.

A database that went away (PostgreSQL restarted, a full disk, a read-only
file) is a fault of this server, not of the request: the caller gets
UNAVAILABLE with a reason and a RetryInfo, never INTERNAL, and the
server's health says NOT_SERVING until the database works again, so a
load balancer drains it meanwhile. The fault is logged once when it
starts and once when it ends, not once per failed request.

Domain code: no grpc here. `follow_health` takes the service's health
setter as a callable.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

import structlog

from aitbc.errors import Unavailable

log = structlog.get_logger()

# ErrorInfo reasons a client can branch on.
DATABASE_UNAVAILABLE = "DATABASE_UNAVAILABLE"
STORAGE_FULL = "STORAGE_FULL"
STORAGE_READONLY = "STORAGE_READONLY"
STORAGE_ERROR = "STORAGE_ERROR"

# How often the store is probed: while it works (PostgreSQL only: a
# SELECT 1; SQLite faults show on writes), and while it does not.
PROBE_EVERY_SECS = 2.0
PROBE_WHILE_DOWN_SECS = 0.5


class StorageUnavailable(Unavailable):
    """The store cannot do its work now; the same call may succeed later."""

    def __init__(self, message: str, *, reason: str = DATABASE_UNAVAILABLE, retry_after: float = 1.0) -> None:
        super().__init__(message, reason=reason, retry_after=retry_after)


class StoreHealth:
    """Whether a store's database works, as its last calls and probes found
    it. Written from store threads, read by the health loop."""

    def __init__(self, store: str) -> None:
        self._store = store
        self._lock = threading.Lock()
        self.fault: StorageUnavailable | None = None
        self._since = 0.0

    @property
    def serving(self) -> bool:
        return self.fault is None

    def down_since(self) -> float | None:
        """time.monotonic() when the current fault began; None when serving."""
        with self._lock:
            return self._since if self.fault is not None else None

    def failed(self, fault: StorageUnavailable, cause: BaseException | None = None) -> None:
        with self._lock:
            first = self.fault is None or self.fault.reason != fault.reason
            if self.fault is None:
                self._since = time.monotonic()
            self.fault = fault
        if first:
            log.warning("storage_fault", store=self._store, reason=fault.reason, error=str(cause or fault.message))

    def ok(self) -> None:
        if self.fault is None:  # the common case: no lock, no log
            return
        with self._lock:
            if self.fault is None:
                return
            reason, self.fault = self.fault.reason, None
            after = time.monotonic() - self._since
        log.info("storage_recovered", store=self._store, reason=reason, after_secs=round(after, 3))


def sqlite_fault(exc: sqlite3.Error) -> StorageUnavailable | None:
    """The fault an SQLite error means, or None for errors that are not the
    storage's (a constraint, a bug)."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None:
        return None
    primary = code & 0xFF  # extended codes carry the primary in the low byte
    if primary == sqlite3.SQLITE_FULL:
        return StorageUnavailable(
            "the database's disk is full: nothing was written; retry once space is freed", reason=STORAGE_FULL
        )
    if primary == sqlite3.SQLITE_READONLY:
        return StorageUnavailable(
            "the database is read-only here: nothing was written; retry once it is writable",
            reason=STORAGE_READONLY,
        )
    if primary in (sqlite3.SQLITE_IOERR, sqlite3.SQLITE_CANTOPEN):
        return StorageUnavailable("the database's disk failed a read or write; retry later", reason=STORAGE_ERROR)
    return None


class ProbedStore(Protocol):
    health: StoreHealth

    def probe(self) -> None:
        """Try the database once (blocking, briefly): health.ok() if it
        works, health.failed() if not."""


async def follow_health(store: ProbedStore, set_serving: Callable[[bool], Awaitable[None]]) -> None:
    """Keep the service's health in step with its store, until cancelled.
    Real calls flip store.health as they fail or succeed; this loop passes
    that on within a quarter second, and probes the store itself so that
    health also changes with no traffic (PROBE_EVERY_SECS while it works,
    PROBE_WHILE_DOWN_SECS while it does not: a fault heals without a
    restart, and is noticed although a drained server gets no calls)."""
    serving = True
    last_probe = time.monotonic()
    while True:
        now = time.monotonic()
        if now - last_probe >= (PROBE_EVERY_SECS if store.health.serving else PROBE_WHILE_DOWN_SECS):
            last_probe = now
            try:
                await asyncio.to_thread(store.probe)
            except Exception:  # faults land in store.health; this is something else
                log.exception("store_probe_error")
        if store.health.serving != serving:
            serving = store.health.serving
            await set_serving(serving)
        await asyncio.sleep(0.25)
