"""SQLite plumbing shared by the embedded stores: WAL, durable commits,
one serialised connection, and a schema version that refuses to open a file
written by another version instead of misreading it."""

from __future__ import annotations

import re
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


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
