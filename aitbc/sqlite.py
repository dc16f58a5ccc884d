"""SQLite plumbing shared by the embedded stores: WAL, durable commits,
one serialised connection, and a schema version that refuses to open a file
written by another version instead of misreading it.

Storage faults (a full disk, a read-only file, an I/O error) become
StorageUnavailable, with the store's health failed until a probe write
succeeds again (see aitbc.dbfaults). A store opened read-only writes
nothing at all, so an audit can read a ledger on a full disk or a
read-only mount."""

from __future__ import annotations

import contextlib
import re
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from aitbc.dbfaults import StorageUnavailable, StoreHealth, sqlite_fault

# What a probe writes (and frees) while the store is faulted: enough new
# pages that a file which cannot grow fails it.
PROBE_BYTES = 64 * 1024


class SchemaMismatch(RuntimeError):
    pass


class NoDatabase(SchemaMismatch):
    """A read-only open found no database to read."""


def _open_read_only(path: Path) -> sqlite3.Connection:
    """Open without writing anything: no journal mode, no schema, no
    version. SQLite's read-only mode still wants the WAL's shared-memory
    file, which a read-only directory or mount cannot hold when the writer
    is gone; with no WAL file left, every commit is in the database file
    itself, so reading it as immutable loses nothing."""
    if not path.is_file():
        raise NoDatabase(f"{path} does not exist")
    uri = path.resolve().as_uri() + "?mode=ro"
    try:
        db = sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None)
        db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
        return db
    except sqlite3.OperationalError:
        wal = path.with_name(path.name + "-wal")
        if wal.exists() and wal.stat().st_size > 0:
            raise
    return sqlite3.connect(uri + "&immutable=1", uri=True, check_same_thread=False, isolation_level=None)


class SqliteStore:
    SCHEMA = ""
    SCHEMA_VERSION = 1

    def __init__(self, path: Path, *, read_only: bool = False) -> None:
        path = Path(path)
        self.read_only = read_only
        self.health = StoreHealth(path.name)
        self._lock = threading.Lock()
        if read_only:
            self._db = _open_read_only(path)
            self._check_version(path)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk before the RPC that made it is answered.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._check_version(path)
        self._db.executescript(self.SCHEMA)
        self._db.execute(f"PRAGMA user_version = {int(self.SCHEMA_VERSION)}")

    def _check_version(self, path: Path) -> None:
        """Refuse a file of another schema version (or, read-only, none)."""
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        tables = self._db.execute("SELECT COUNT(*) FROM sqlite_master WHERE type = 'table'").fetchone()[0]
        if tables and version != self.SCHEMA_VERSION:
            self._db.close()
            raise SchemaMismatch(
                f"{path} has schema version {version}, this build expects {self.SCHEMA_VERSION}; "
                "for a dev network run `make clean`, otherwise migrate it first"
            )
        if not tables and self.read_only:
            self._db.close()
            raise NoDatabase(f"{path} holds no tables: not a database of this service")

    def close(self) -> None:
        self._db.close()

    def _fault(self, exc: sqlite3.Error) -> StorageUnavailable | None:
        fault = sqlite_fault(exc)
        if fault is not None:
            self.health.failed(fault, exc)
        return fault

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                yield self._db
            except sqlite3.Error as exc:
                fault = self._fault(exc)
                if fault is None:
                    raise
                raise fault from exc

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One transaction; read-only stores take a snapshot instead of
        the write lock."""
        with self._lock:
            try:
                self._db.execute("BEGIN" if self.read_only else "BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    # SQLite itself rolls back on some errors (a full disk).
                    if self._db.in_transaction:
                        with contextlib.suppress(sqlite3.Error):
                            self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                if self._db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        self._db.execute("ROLLBACK")
                fault = self._fault(exc)
                if fault is None:
                    raise
                raise fault from exc

    def probe(self) -> None:
        """While faulted, try a real write that needs new pages; health
        heals when it commits. Nothing to probe while it works: SQLite is
        a file, its faults show on the next write."""
        if self.health.serving or self.read_only:
            return
        with contextlib.suppress(StorageUnavailable):
            with self._tx() as db:
                db.execute("CREATE TABLE IF NOT EXISTS aitbc_probe (b BLOB NOT NULL)")
                db.execute("INSERT INTO aitbc_probe(b) VALUES (zeroblob(?))", (PROBE_BYTES,))
            with self._tx() as db:
                db.execute("DELETE FROM aitbc_probe")
            self.health.ok()


def apply_postgres_schema(cur: Any, schema: str, *, name: str, version: int, lock: int) -> None:
    """Create `name`'s tables at `version` in one transaction (the caller's),
    under an advisory lock so replicas starting together do not race; refuse
    a database written by another version, as the SQLite stores do.
    `aitbc_schema` records each store's version."""
    cur.execute("SELECT pg_advisory_xact_lock(%s)", (lock,))
    cur.execute("CREATE TABLE IF NOT EXISTS aitbc_schema (name TEXT PRIMARY KEY, version BIGINT NOT NULL)")
    cur.execute("SELECT version FROM aitbc_schema WHERE name = %s", (name,))
    row = cur.fetchone()
    tables = re.findall(r"CREATE TABLE IF NOT EXISTS (\w+)", schema)
    if row is None:
        cur.execute(
            "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = current_schema() "
            "AND table_name = ANY(%s)",
            (tables,),
        )
        if cur.fetchone()[0]:
            raise SchemaMismatch(
                f"the database holds {name} tables from a build before schema versions; "
                f"this build expects version {version}: migrate it or use a fresh database"
            )
    elif int(row[0]) != version:
        raise SchemaMismatch(
            f"the database has {name} schema version {row[0]}, this build expects {version}: migrate it first"
        )
    cur.execute(postgres_schema(schema))
    cur.execute("INSERT INTO aitbc_schema(name, version) VALUES (%s, %s) ON CONFLICT DO NOTHING", (name, version))


def postgres_schema(sqlite_schema: str) -> str:
    """The same tables for PostgreSQL: one schema text serves both stores.
    `id INTEGER PRIMARY KEY` (SQLite's rowid) becomes an identity column."""
    return (
        sqlite_schema.replace("INTEGER PRIMARY KEY,", "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,")
        .replace("BLOB NOT NULL DEFAULT x''", "BYTEA NOT NULL DEFAULT ''::bytea")
        .replace("BLOB", "BYTEA")
        .replace("REAL", "DOUBLE PRECISION")
        .replace("INTEGER", "BIGINT")
    )
