"""SQLite plumbing shared by the embedded stores: WAL, durable commits,
one serialised connection, and a schema version that refuses to open a file
written by another version instead of misreading it."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class SchemaMismatch(RuntimeError):
    pass


class SqliteStore:
    SCHEMA = ""
    SCHEMA_VERSION = 1

    def __init__(self, path: Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk before the RPC that made it is answered.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._lock = threading.Lock()
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        tables = self._db.execute("SELECT COUNT(*) FROM sqlite_master WHERE type = 'table'").fetchone()[0]
        if tables and version != self.SCHEMA_VERSION:
            self._db.close()
            raise SchemaMismatch(
                f"{path} has schema version {version}, this build expects {self.SCHEMA_VERSION}; "
                "for a dev network run `make clean`, otherwise migrate it first"
            )
        self._db.executescript(self.SCHEMA)
        self._db.execute(f"PRAGMA user_version = {int(self.SCHEMA_VERSION)}")

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            yield self._db

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")


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
