"""Where the ledger lives: SQLite (embedded default) or PostgreSQL (several
wallet processes on one database). Both run a ledger operation as one
transaction and are durable before they return.

Both commit concurrent operations together (group commit, see
LedgerStore): one writer thread, a savepoint per operation, one fsync per
batch. That is what lets one SQLite file settle thousands of holds a second,
and keeps PostgreSQL's hot rows (the treasury, busy miners) from
serialising every settlement behind its own commit.

PostgreSQL: READ COMMITTED transactions. The ledger changes balances in SQL (x = x + delta, debits
guarded by x >= amount) and closes holds with a compare-and-set, so row
locks queue concurrent writers instead of aborting them; unique-key races
(two processes applying one request id) and deadlocks are retried from the
start. Audits (`check`) read one REPEATABLE READ snapshot.

Faults (see aitbc.dbfaults, aitbc.pg): a lost PostgreSQL connection fails
the batch, which runs again on a new connection until the outage is
RETRY_SECS old, then answers UNAVAILABLE; a full or read-only SQLite file
answers UNAVAILABLE at once. Running a batch again is safe even when the
connection was lost during its COMMIT (so it may have committed): every
ledger write is keyed (mint and transfer by request id, holds by job id,
a settlement by job id and the settlement's digest, a release by job id,
an account by its key) and a second run finds the first one's result and
answers the same. Audits open the store read-only (`read_only`).
"""

from __future__ import annotations

import asyncio
import queue
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, TypeVar

from aitbc.dbfaults import StoreHealth
from aitbc.sqlite import SchemaMismatch, SqliteStore, apply_postgres_schema
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
CREATE TABLE IF NOT EXISTS supply (
    id     INTEGER PRIMARY KEY CHECK (id = 1),
    minted INTEGER NOT NULL CHECK (minted >= 0)
);
INSERT INTO supply(id, minted) VALUES (1, 0) ON CONFLICT(id) DO NOTHING;
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


class LedgerStore:
    """Runs ledger operations, each as one durable transaction.

    `run` (async) hands operations to one writer thread that commits
    whatever has queued up together: each operation under its own
    savepoint, so one that fails rolls back alone, and one commit (one
    fsync) covers the batch. Subclasses say how to open a transaction and
    which errors mean "run that operation again".
    """

    MAX_BATCH = 256
    RETRYABLE: tuple[type[BaseException], ...] = ()
    # Errors of the storage, not of an operation: they fail (or rerun) the
    # whole batch, whose transaction is gone with them.
    LOST: tuple[type[BaseException], ...] = ()
    health: StoreHealth

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[Op[Any], asyncio.Future[Any]] | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _batch_tx(self) -> AbstractContextManager[tuple[Tx, Callable[[str], object]]]:
        """One transaction: (the ledger's view of it, raw statement runner)."""
        raise NotImplementedError

    def call(self, op: Op[T], *, snapshot: bool = False) -> T:
        """Run op in one transaction now; snapshot=True: every statement sees
        the same committed state (for audits)."""
        raise NotImplementedError

    def _attempts(self, fn: Callable[[], T]) -> T:
        """fn(), run again after a lost connection where the store can."""
        return fn()

    def probe(self) -> None:
        """Try the database once; self.health follows (aitbc.dbfaults)."""
        raise NotImplementedError

    async def run(self, op: Op[T]) -> T:
        if self._writer is None:
            self._loop = asyncio.get_running_loop()
            self._writer = threading.Thread(target=self._write_loop, name="ledger-writer", daemon=True)
            self._writer.start()
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.put((op, fut))
        return await fut

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
            outcomes = self._commit_batch([op for op, _ in batch])
            # One wake-up of the event loop per batch, not one per operation.
            assert self._loop is not None
            self._loop.call_soon_threadsafe(_resolve, [fut for _, fut in batch], outcomes)

    def _commit_batch(self, ops: list[Op[Any]]) -> list[tuple[bool, Any]]:
        try:
            # Safe to run again whatever point it failed at: see the module.
            return self._attempts(lambda: self._try_batch(ops))
        except Exception as exc:  # the batch failed as a whole (a storage fault)
            return [(False, exc)] * len(ops)

    def _try_batch(self, ops: list[Op[Any]]) -> list[tuple[bool, Any]]:
        for attempt in range(20):
            outcomes: list[tuple[bool, Any]] = []
            try:
                with self._batch_tx() as (tx, raw):
                    for op in ops:
                        outcomes.append(self._one(op, tx, raw))
                return outcomes
            except self.RETRYABLE:
                time.sleep(random.uniform(0, 0.002 * (attempt + 1)))
        return [(False, RuntimeError("ledger batch kept conflicting"))] * len(ops)

    def _one(self, op: Op[Any], tx: Tx, raw: Callable[[str], object]) -> tuple[bool, Any]:
        for attempt in range(20):
            raw("SAVEPOINT op")
            try:
                result = op(tx)
            except self.RETRYABLE:
                # Lost a race to another process (same request id, a
                # deadlock): undo this operation only and run it again; it
                # now sees the winner's committed write.
                raw("ROLLBACK TO SAVEPOINT op")
                raw("RELEASE SAVEPOINT op")
                time.sleep(random.uniform(0, 0.001 * (attempt + 1)))
                continue
            except self.LOST:
                raise
            except Exception as exc:  # one operation's failure is its own
                raw("ROLLBACK TO SAVEPOINT op")
                raw("RELEASE SAVEPOINT op")
                return False, exc
            raw("RELEASE SAVEPOINT op")
            return True, result
        return False, RuntimeError("ledger operation kept conflicting")

    def _stop_writer(self) -> None:
        if self._writer is not None:
            self._queue.put(None)
            self._writer.join(timeout=10)

    def close(self) -> None:
        raise NotImplementedError


def _resolve(futures: list[asyncio.Future[Any]], outcomes: list[tuple[bool, Any]]) -> None:
    for fut, (ok, value) in zip(futures, outcomes, strict=True):
        if fut.cancelled():
            continue
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)


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
    SCHEMA_VERSION = 3
    LOST = (sqlite3.OperationalError,)

    def __init__(self, path: Path, *, read_only: bool = False) -> None:
        SqliteStore.__init__(self, path, read_only=read_only)
        LedgerStore.__init__(self)

    def call(self, op: Op[T], *, snapshot: bool = False) -> T:
        # SQLite transactions are serialisable: always a snapshot.
        with self._tx() as db:
            return op(_SqliteTx(db))

    @contextmanager
    def _batch_tx(self) -> Iterator[tuple[Tx, Callable[[str], object]]]:
        with self._tx() as db:
            yield _SqliteTx(db), lambda sql: db.execute(sql)

    def close(self) -> None:
        self._stop_writer()
        SqliteStore.close(self)


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

    def __init__(self, dsn: str, pool_size: int = 4, *, read_only: bool = False) -> None:
        import psycopg

        from aitbc.pg import PgConnections

        super().__init__()
        self.RETRYABLE = (
            psycopg.errors.SerializationFailure,
            psycopg.errors.DeadlockDetected,
            psycopg.errors.UniqueViolation,
        )
        self.LOST = (psycopg.OperationalError,)
        self.read_only = read_only
        with psycopg.connect(dsn, autocommit=False) as conn:
            with conn.cursor() as cur:
                if read_only:
                    _check_postgres_version(cur)
                else:
                    apply_postgres_schema(
                        cur,
                        SQLITE_SCHEMA,
                        name="wallet",
                        version=SqliteLedgerStore.SCHEMA_VERSION,
                        lock=self.SCHEMA_LOCK,
                    )
            conn.commit()
        self.health = StoreHealth("wallet")
        # The writer thread's connection and call()'s, from one pool.
        self._pg = PgConnections(dsn, name="wallet", health=self.health, min_size=2, max_size=pool_size + 1)

    @contextmanager
    def _batch_tx(self) -> Iterator[tuple[Tx, Callable[[str], object]]]:
        with self._pg.transaction() as conn, conn.cursor() as cur:
            yield _PgTx(cur), lambda sql: cur.execute(sql)

    def _attempts(self, fn: Callable[[], T]) -> T:
        return self._pg.run(fn, idempotent=True)

    def call(self, op: Op[T], *, snapshot: bool = False) -> T:
        return self._attempts(lambda: self._call_once(op, snapshot))

    def _call_once(self, op: Op[T], snapshot: bool) -> T:
        for attempt in range(100):
            try:
                with self._pg.transaction() as conn, conn.cursor() as cur:
                    if snapshot or self.read_only:
                        cur.execute(
                            "SET TRANSACTION ISOLATION LEVEL "
                            + ("REPEATABLE READ" if snapshot else "READ COMMITTED")
                            + (", READ ONLY" if self.read_only else "")
                        )
                    return op(_PgTx(cur))
            except self.RETRYABLE:
                # Another process touched the same rows: run again from
                # the start; the loser of a race sees the winner's write.
                time.sleep(random.uniform(0, 0.002 * (attempt + 1)))
        raise RuntimeError("ledger transaction kept conflicting; giving up after 100 attempts")

    def probe(self) -> None:
        self._pg.probe()

    def close(self) -> None:
        self._stop_writer()
        self._pg.close()


def _check_postgres_version(cur: Any) -> None:
    """The read-only twin of apply_postgres_schema: refuse a database
    without the wallet's tables, or of another version, writing nothing."""
    cur.execute("SELECT to_regclass('aitbc_schema') IS NOT NULL")
    row = cur.fetchone()
    version = None
    if row and row[0]:
        cur.execute("SELECT version FROM aitbc_schema WHERE name = 'wallet'")
        found = cur.fetchone()
        version = int(found[0]) if found else None
    if version is None:
        raise SchemaMismatch("the database holds no wallet ledger")
    if version != SqliteLedgerStore.SCHEMA_VERSION:
        raise SchemaMismatch(
            f"the database has wallet schema version {version}, this build expects "
            f"{SqliteLedgerStore.SCHEMA_VERSION}: migrate it first"
        )


def open_store(url: str | Path, *, read_only: bool = False) -> LedgerStore:
    """`postgresql://…` opens PostgreSQL; anything else is a SQLite path.
    read_only: for audits, writing nothing (not even the schema)."""
    text = str(url)
    if text.startswith(("postgresql://", "postgres://")):
        return PostgresLedgerStore(text, read_only=read_only)
    return SqliteLedgerStore(Path(text), read_only=read_only)
