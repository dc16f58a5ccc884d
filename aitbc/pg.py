"""PostgreSQL connections that heal, shared by the PostgreSQL stores.

A psycopg_pool pool holds the connections. A connection the server closed
(a restart, a failover, an administrator) fails its next statement;
psycopg marks it broken, the pool drops it when it comes back and opens a
new one in the background, with backoff while the server is away. Nothing
here holds a connection for good, so the store heals when the server
returns, without a restart.

A call that failed on a lost connection is run again from the start
(`run`), for up to RETRY_SECS of an outage, when that is safe:
- it failed before COMMIT was sent: PostgreSQL rolled the transaction
  back, nothing happened, so running it again is always safe;
- it failed during COMMIT: the change may or may not have been made. Only
  calls the caller declares idempotent (running twice is the same as
  once, such as writes keyed by a request id) are run again; the others
  are reported as UNAVAILABLE saying so.
When the outage outlasts RETRY_SECS, calls fail at once with UNAVAILABLE
(and RetryInfo) rather than pile up behind it. Lost connections are never
INTERNAL.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from aitbc.dbfaults import DATABASE_UNAVAILABLE, STORAGE_FULL, STORAGE_READONLY, StorageUnavailable, StoreHealth

T = TypeVar("T")

# How long a call waits out a lost database before it answers UNAVAILABLE:
# a restart (crash recovery included) takes a second or two.
RETRY_SECS = 10.0
# The longest wait for a connection from the pool in one attempt.
GETCONN_SECS = 1.0
# The pool stops backing off and gives up a connection attempt after this
# long; the next caller starts a fresh one at once. Bounds the time from
# the server's return to our first connection (backoff doubles from 1 s).
RECONNECT_SECS = 5.0


class ConnectionLost(StorageUnavailable):
    """The connection failed under a call. `at_commit`: it failed while
    committing, so the change may have been made."""

    def __init__(self, *, at_commit: bool) -> None:
        if at_commit:
            message = (
                "the database connection was lost while committing: the change may have been made; "
                "retry with the same request_id"
            )
        else:
            message = "the database is unreachable: nothing was changed; retry"
        super().__init__(message, reason=DATABASE_UNAVAILABLE)
        self.at_commit = at_commit


class PgConnections:
    """A pool of autocommit connections to one database, the store's
    health, and the rule for running calls again (see the module)."""

    def __init__(
        self,
        dsn: str,
        *,
        name: str,
        health: StoreHealth,
        min_size: int = 1,
        max_size: int = 4,
        retry_secs: float = RETRY_SECS,
    ) -> None:
        import psycopg
        from psycopg_pool import ConnectionPool, PoolClosed

        # The pool warns once per connection it drops and per attempt it
        # makes, in plain text; StoreHealth says it once, as a JSON line.
        logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
        self._psycopg = psycopg
        self._closed_error = PoolClosed
        self.health = health
        self._retry_secs = retry_secs
        self.pool = ConnectionPool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            # Autocommit: a read is one statement, a transaction says BEGIN.
            # connect_timeout: a server that does not answer at all (a
            # network partition) must not stall the pool's reconnects.
            kwargs={"autocommit": True, "connect_timeout": 5},
            name=name,
            reconnect_timeout=RECONNECT_SECS,
            open=False,
        )
        self.pool.open(wait=True, timeout=30.0)

    def _lost(self, exc: BaseException, conn: Any, *, at_commit: bool) -> BaseException:
        """What a psycopg error means to the caller."""
        errors = self._psycopg.errors
        if isinstance(exc, errors.TransactionRollback):
            return exc  # deadlock or serialisation failure: the caller's to retry
        if isinstance(exc, self._closed_error):
            return StorageUnavailable("the store is shutting down", reason=DATABASE_UNAVAILABLE)
        if isinstance(exc, errors.DiskFull):
            return StorageUnavailable("the database's disk is full: retry once space is freed", reason=STORAGE_FULL)
        if isinstance(exc, errors.ReadOnlySqlTransaction):
            return StorageUnavailable("the database is read-only (a standby?): retry", reason=STORAGE_READONLY)
        if not isinstance(exc, self._psycopg.OperationalError):
            return exc
        lost = ConnectionLost(at_commit=at_commit)
        # A pool that is merely busy (PoolTimeout with a live server) is no
        # fault of the database; a connection that broke, or none at all
        # while the pool reconnects, is.
        if conn is None and self.health.serving:
            return lost
        if conn is None or conn.broken:
            self.health.failed(lost, exc)
        return lost

    @contextlib.contextmanager
    def connection(self) -> Iterator[Any]:
        """An autocommit connection: each statement its own transaction."""
        conn = None
        try:
            with self.pool.connection(timeout=GETCONN_SECS) as conn:
                yield conn
        except self._psycopg.Error as exc:
            mapped = self._lost(exc, conn, at_commit=False)
            if mapped is exc:
                raise
            raise mapped from exc

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Any]:
        """A connection inside one transaction, committed on leaving."""
        conn = None
        committing = False
        try:
            with self.pool.connection(timeout=GETCONN_SECS) as conn, conn.transaction():
                yield conn
                committing = True  # what fails from here on failed in COMMIT
        except self._psycopg.Error as exc:
            mapped = self._lost(exc, conn, at_commit=committing)
            if mapped is exc:
                raise
            raise mapped from exc

    def run(self, fn: Callable[[], T], *, idempotent: bool) -> T:
        """fn(), run again after a lost connection where that is safe (see
        the module), until the outage is RETRY_SECS old."""
        start = time.monotonic()
        down = self.health.down_since()
        give_up = min(start, down if down is not None else start) + self._retry_secs
        delay = 0.05
        while True:
            try:
                result = fn()
            except ConnectionLost as lost:
                now = time.monotonic()
                if (lost.at_commit and not idempotent) or now >= give_up:
                    raise
                time.sleep(min(delay, give_up - now))
                delay = min(delay * 2, 0.5)
                continue
            self.health.ok()
            return result

    def probe(self) -> None:
        """One round trip; health follows the answer. While down, every
        idle connection is checked first, so the dead ones are replaced
        together instead of failing one call each."""
        with contextlib.suppress(StorageUnavailable):
            if not self.health.serving:
                self.pool.check()
            with self.connection() as conn:
                conn.execute("SELECT 1")
            self.health.ok()

    def close(self) -> None:
        self.pool.close()
