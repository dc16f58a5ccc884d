"""Where the ledger lives: SQLite (embedded default) or PostgreSQL (several
wallet processes on one database). Both run a ledger operation as one
transaction and are durable before they return.

SQLite: one writer thread commits concurrent operations together (group
commit): each operation runs under its own savepoint, so one that fails
rolls back alone, and one fsync covers the batch. That is what lets a
single SQLite file settle thousands of holds a second.

PostgreSQL: a pool of connections, each operation a SERIALIZABLE
transaction, retried on serialization failures and unique-key races, so
concurrent processes can never both pay one job.
"""

from __future__ import annotations

import asyncio
import queue
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from aitbc.sqlite import SqliteStore
from wallet_svc._ledger import Tx

T = TypeVar("T")
Op = Callable[[Tx], T]

SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS accounts (
    address     TEXT PRIMARY KEY,
    public_key  BLOB NOT NULL UNIQUE,
    create_time TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS balances (
    address   TEXT PRIMARY KEY,
    available INTEGER NOT NULL CHECK (available >= 0),
    held      INTEGER NOT NULL CHECK (held >= 0)
);
CREATE TABLE IF NOT EXISTS txns (
    id          INTEGER PRIMARY KEY,
    kind        TEXT NOT NULL,
    job_id      TEXT,
    request_id  TEXT UNIQUE,
    body_sha256 BLOB,
    create_time TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS txns_by_job ON txns(job_id);
CREATE TABLE IF NOT EXISTS postings (
    txn_id       INTEGER NOT NULL REFERENCES txns(id),
    address      TEXT NOT NULL,
    bucket       TEXT NOT NULL CHECK (bucket IN ('available', 'held')),
    amount       INTEGER NOT NULL,
    counterparty TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS postings_by_address ON postings(address, txn_id);
CREATE INDEX IF NOT EXISTS postings_by_txn ON postings(txn_id);
CREATE TABLE IF NOT EXISTS holds (
    job_id            TEXT PRIMARY KEY,
    address           TEXT NOT NULL,
    amount            INTEGER NOT NULL CHECK (amount > 0),
    state             TEXT NOT NULL,
    miner_address     TEXT,
    miner_amount      INTEGER NOT NULL DEFAULT 0,
    fee_amount        INTEGER NOT NULL DEFAULT 0,
    refunded_amount   INTEGER NOT NULL DEFAULT 0,
    settlement_sha256 BLOB,
    create_time       TEXT NOT NULL,
    close_time        TEXT
);
"""

PG_SCHEMA = """
CREATE TABLE IF NOT EXISTS accounts (
    address     TEXT PRIMARY KEY,
    public_key  BYTEA NOT NULL UNIQUE,
    create_time TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS balances (
    address   TEXT PRIMARY KEY,
    available BIGINT NOT NULL CHECK (available >= 0),
    held      BIGINT NOT NULL CHECK (held >= 0)
);
CREATE TABLE IF NOT EXISTS txns (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind        TEXT NOT NULL,
    job_id      TEXT,
    request_id  TEXT UNIQUE,
    body_sha256 BYTEA,
    create_time TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS txns_by_job ON txns(job_id);
CREATE TABLE IF NOT EXISTS postings (
    txn_id       BIGINT NOT NULL REFERENCES txns(id),
    address      TEXT NOT NULL,
    bucket       TEXT NOT NULL CHECK (bucket IN ('available', 'held')),
    amount       BIGINT NOT NULL,
    counterparty TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS postings_by_address ON postings(address, txn_id);
CREATE INDEX IF NOT EXISTS postings_by_txn ON postings(txn_id);
CREATE TABLE IF NOT EXISTS holds (
    job_id            TEXT PRIMARY KEY,
    address           TEXT NOT NULL,
    amount            BIGINT NOT NULL CHECK (amount > 0),
    state             TEXT NOT NULL,
    miner_address     TEXT,
    miner_amount      BIGINT NOT NULL DEFAULT 0,
    fee_amount        BIGINT NOT NULL DEFAULT 0,
    refunded_amount   BIGINT NOT NULL DEFAULT 0,
    settlement_sha256 BYTEA,
    create_time       TEXT NOT NULL,
    close_time        TEXT
);
"""


class LedgerStore:
    """Runs ledger operations, each as one durable transaction."""

    def call(self, op: Op[T]) -> T:
        raise NotImplementedError

    async def run(self, op: Op[T]) -> T:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class _SqliteTx:
    def __init__(self, db: Any) -> None:
        self._db = db

    def one(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        row: tuple[Any, ...] | None = self._db.execute(sql, params).fetchone()
        return row

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        rows: list[tuple[Any, ...]] = self._db.execute(sql, params).fetchall()
        return rows

    def run(self, sql: str, params: Sequence[Any] = ()) -> int:
        return int(self._db.execute(sql, params).rowcount)


class SqliteLedgerStore(SqliteStore, LedgerStore):
    SCHEMA = SQLITE_SCHEMA
    SCHEMA_VERSION = 2
    MAX_BATCH = 256

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._queue: queue.SimpleQueue[tuple[Op[Any], Future[Any]] | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None

    def call(self, op: Op[T]) -> T:
        with self._tx() as db:
            return op(_SqliteTx(db))

    async def run(self, op: Op[T]) -> T:
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_loop, name="ledger-writer", daemon=True)
            self._writer.start()
        fut: Future[T] = Future()
        self._queue.put((op, fut))
        return await asyncio.wrap_future(fut)

    def _write_loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < self.MAX_BATCH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)
                    break
                batch.append(item)
            self._commit_batch(batch)

    def _commit_batch(self, batch: list[tuple[Op[Any], Future[Any]]]) -> None:
        outcomes: list[tuple[bool, Any]] = []
        try:
            with self._tx() as db:
                tx = _SqliteTx(db)
                for op, _ in batch:
                    db.execute("SAVEPOINT op")
                    try:
                        outcomes.append((True, op(tx)))
                        db.execute("RELEASE op")
                    except Exception as exc:  # one operation's failure is its own
                        db.execute("ROLLBACK TO op")
                        db.execute("RELEASE op")
                        outcomes.append((False, exc))
        except Exception as exc:  # the commit itself failed: nothing happened
            for _, fut in batch:
                fut.set_exception(exc)
            return
        for (ok, value), (_, fut) in zip(outcomes, batch, strict=True):
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)

    def close(self) -> None:
        if self._writer is not None:
            self._queue.put(None)
            self._writer.join(timeout=10)
        super().close()


class _PgTx:
    def __init__(self, cur: Any) -> None:
        self._cur = cur

    @staticmethod
    def _sql(sql: str) -> str:
        return sql.replace("?", "%s")

    def one(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        self._cur.execute(self._sql(sql), params)
        row: tuple[Any, ...] | None = self._cur.fetchone()
        return row

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        self._cur.execute(self._sql(sql), params)
        rows: list[tuple[Any, ...]] = self._cur.fetchall()
        return rows

    def run(self, sql: str, params: Sequence[Any] = ()) -> int:
        self._cur.execute(self._sql(sql), params)
        return int(self._cur.rowcount)


class PostgresLedgerStore(LedgerStore):
    SCHEMA_LOCK = 0x41495442  # "AITB": serialises schema creation across processes

    def __init__(self, dsn: str, pool_size: int = 8) -> None:
        import psycopg

        self._psycopg = psycopg
        self._retryable = (
            psycopg.errors.SerializationFailure,
            psycopg.errors.DeadlockDetected,
            psycopg.errors.UniqueViolation,
        )
        with psycopg.connect(dsn, autocommit=False) as conn:
            with conn.cursor() as cur:
                cur.execute("SELECT pg_advisory_xact_lock(%s)", (self.SCHEMA_LOCK,))
                cur.execute(PG_SCHEMA)
            conn.commit()
        self._pool: queue.SimpleQueue[Any] = queue.SimpleQueue()
        for _ in range(pool_size):
            conn = psycopg.connect(dsn, autocommit=False)
            conn.isolation_level = psycopg.IsolationLevel.SERIALIZABLE
            self._pool.put(conn)
        self._size = pool_size
        self._exec = ThreadPoolExecutor(max_workers=pool_size, thread_name_prefix="ledger-pg")

    def call(self, op: Op[T]) -> T:
        conn = self._pool.get()
        try:
            for attempt in range(100):
                try:
                    with conn.transaction(), conn.cursor() as cur:
                        return op(_PgTx(cur))
                except self._retryable:
                    # Another process touched the same rows: run again from
                    # the start; the loser of a race sees the winner's write.
                    time.sleep(random.uniform(0, 0.002 * (attempt + 1)))
            raise RuntimeError("ledger transaction kept conflicting; giving up after 100 attempts")
        finally:
            self._pool.put(conn)

    async def run(self, op: Op[T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._exec, self.call, op)

    def close(self) -> None:
        self._exec.shutdown(wait=True)
        for _ in range(self._size):
            self._pool.get().close()


def open_store(url: str | Path) -> LedgerStore:
    """`postgresql://…` opens PostgreSQL; anything else is a SQLite path."""
    text = str(url)
    if text.startswith(("postgresql://", "postgres://")):
        return PostgresLedgerStore(text)
    return SqliteLedgerStore(Path(text))
