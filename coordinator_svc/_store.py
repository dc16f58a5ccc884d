"""Job store: SQLite (embedded) or PostgreSQL (several coordinator replicas on
one database). Every transition is a compare-and-set on the job's
state (and, where a miner speaks, its lease id: fencing), committed durably
before anyone is told about it. The settlement outbox lives in the same
database so a verdict and the intent to pay commit together.

A lost database is UNAVAILABLE, never INTERNAL (aitbc.dbfaults). On
PostgreSQL a call that failed on a lost connection runs again on a new one
(aitbc.pg): any call whose transaction did not reach COMMIT, and, after a
failure during COMMIT, the calls marked @_idempotent. A compare-and-set
(@_once) that may have committed is not run again: its second run would
find its own change and report that someone else moved the job first."""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from aitbc.dbfaults import StoreHealth
from aitbc.sqlite import SqliteStore, apply_postgres_schema, postgres_schema

F = TypeVar("F", bound=Callable[..., Any])

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id         TEXT PRIMARY KEY,
    client_name    TEXT NOT NULL,
    client_address TEXT NOT NULL,
    request_id     TEXT NOT NULL,
    spec           BLOB NOT NULL,
    spec_sha256    BLOB NOT NULL,
    workload       TEXT NOT NULL,
    state          TEXT NOT NULL,
    attempts       INTEGER NOT NULL DEFAULT 0,
    miner_id       TEXT NOT NULL DEFAULT '',
    lease_id       TEXT NOT NULL DEFAULT '',
    lease_deadline REAL NOT NULL DEFAULT 0,
    max_price      INTEGER NOT NULL,
    price          INTEGER NOT NULL,
    miner_amount   INTEGER NOT NULL DEFAULT 0,
    fee_amount     INTEGER NOT NULL DEFAULT 0,
    status_detail  TEXT NOT NULL DEFAULT '',
    verdict        TEXT NOT NULL DEFAULT '',
    output_sha256  BLOB NOT NULL DEFAULT x'',
    usage          BLOB NOT NULL DEFAULT x'',
    receipt        BLOB NOT NULL DEFAULT x'',
    settlement     BLOB NOT NULL DEFAULT x'',
    hold_state     TEXT NOT NULL DEFAULT 'NONE',
    refused_miners TEXT NOT NULL DEFAULT '',
    deadline       REAL NOT NULL DEFAULT 0,
    create_time    TEXT NOT NULL,
    update_time    TEXT NOT NULL,
    runs_needed    INTEGER NOT NULL DEFAULT 1,
    verification   BLOB NOT NULL DEFAULT x'',
    runs           TEXT NOT NULL DEFAULT '[]',
    version        INTEGER NOT NULL DEFAULT 0,
    result_expired INTEGER NOT NULL DEFAULT 0,
    UNIQUE (client_name, request_id)
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs(state, create_time);
CREATE INDEX IF NOT EXISTS jobs_by_client ON jobs(client_name, create_time, job_id);
CREATE INDEX IF NOT EXISTS jobs_by_output ON jobs(output_sha256);
CREATE TABLE IF NOT EXISTS miners (
    miner_id       TEXT PRIMARY KEY,
    public_key     BLOB NOT NULL,
    payout_address TEXT NOT NULL,
    first_seen     TEXT NOT NULL,
    accepted       INTEGER NOT NULL DEFAULT 0,
    refused        INTEGER NOT NULL DEFAULT 0
);
-- Operators' re-keys of miners whose key was lost: the durable record
-- behind the audit line, and what makes a retried reset apply once.
-- Additive: a build without it reads the same file, so the version stays.
CREATE TABLE IF NOT EXISTS miner_key_resets (
    request_id  TEXT PRIMARY KEY,
    miner_id    TEXT NOT NULL,
    old_key     BLOB NOT NULL,
    new_key     BLOB NOT NULL,
    by_name     TEXT NOT NULL,
    reason      TEXT NOT NULL,
    create_time TEXT NOT NULL
);
-- Each lease's run-time bound: past run_deadline without a result the job
-- is taken back, however the miner heartbeats. A table of its own, so
-- additive like miner_key_resets; rows of ended leases are swept.
CREATE TABLE IF NOT EXISTS lease_bounds (
    lease_id     TEXT PRIMARY KEY,
    job_id       TEXT NOT NULL,
    run_deadline REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    job_id       TEXT NOT NULL,
    kind         TEXT NOT NULL CHECK (kind IN ('settle', 'release')),
    payload      BLOB NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL DEFAULT 0,
    last_error   TEXT NOT NULL DEFAULT '',
    done         INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (job_id, kind)
);
"""

# Internal state before the wallet confirmed the hold; shown as QUEUED.
HOLDING = "HOLDING"
QUEUED, ASSIGNED, RUNNING, VERIFYING = "QUEUED", "ASSIGNED", "RUNNING", "VERIFYING"
SETTLING, SETTLED, FAILED, CANCELLED, EXPIRED = "SETTLING", "SETTLED", "FAILED", "CANCELLED", "EXPIRED"
TERMINAL = frozenset({SETTLED, FAILED, CANCELLED, EXPIRED})
ALL_STATES = (HOLDING, QUEUED, ASSIGNED, RUNNING, VERIFYING, SETTLING, SETTLED, FAILED, CANCELLED, EXPIRED)
LEASED = (ASSIGNED, RUNNING)


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


@dataclass(frozen=True)
class JobRecord:
    job_id: str
    client_name: str
    client_address: str
    request_id: str
    spec: bytes
    spec_sha256: bytes
    workload: str
    state: str
    attempts: int
    miner_id: str
    lease_id: str
    lease_deadline: float
    max_price: int
    price: int
    miner_amount: int
    fee_amount: int
    status_detail: str
    verdict: str
    output_sha256: bytes
    usage: bytes
    receipt: bytes
    settlement: bytes
    hold_state: str
    # Space-separated ids of miners this job is never dispatched to again:
    # their result was refused, or is already counted among its runs.
    refused_miners: str
    # Epoch seconds after which an unverified job expires; 0: never.
    deadline: float
    create_time: str
    update_time: str
    # Agreeing results from different miners needed before payment.
    runs_needed: int = 1
    # The resolved VerificationPolicy, serialised.
    verification: bytes = b""
    # JSON list of the results miners returned (see _jobs.Run).
    runs: str = "[]"
    # Raised by one with every change of the job, in the store: what orders
    # two snapshots of it, as a wall clock that steps cannot.
    version: int = 0
    # 1 once retention deleted its result (RESULT_RETENTION_DAYS).
    result_expired: int = 0


_COLUMNS = [f.name for f in fields(JobRecord)]
# Columns added after schema version 4, each with a default older builds
# never read: added in place to a database made before them (ADD COLUMN),
# so the version, and a rollback to the build before, stay possible.
ADDED_COLUMNS = {"version": "INTEGER NOT NULL DEFAULT 0", "result_expired": "INTEGER NOT NULL DEFAULT 0"}
# Made after the columns above, so never before them on an older database.
ADDED_INDEXES = ["CREATE INDEX IF NOT EXISTS jobs_by_retention ON jobs(result_expired, state, update_time)"]
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM jobs"


@dataclass(frozen=True)
class KeyReset:
    old_key: bytes
    new_key: bytes
    # False for a retry of a reset already made (nothing changed now).
    applied: bool
    # The request id was used before for another miner or key.
    conflict: bool = False


@dataclass(frozen=True)
class OutboxItem:
    job_id: str
    kind: str
    payload: bytes
    attempts: int


def _store_call(idempotent: bool) -> Callable[[F], F]:
    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def call(self: JobStore, *args: Any, **kwargs: Any) -> Any:
            return self._attempts(functools.partial(fn, self, *args, **kwargs), idempotent=idempotent)

        return call  # type: ignore[return-value]

    return wrap


# Reads, and writes whose second run answers as the first did.
_idempotent = _store_call(True)
# Writes that may run again only if the first run never reached COMMIT.
_once = _store_call(False)


class JobStore:
    """The store's logic over any DB-API connection with "?" placeholders.
    Subclasses provide _read() and _tx() and, for several replicas, row
    locks and change notifications."""

    # Appended to the read that a transition's compare-and-set decides on:
    # with several writers (PostgreSQL) the row must be locked until commit.
    FOR_UPDATE = ""
    # Called with (workload, new state) after each committed state change
    # made here (metrics).
    on_transition: Callable[[str, str], None] | None = None
    health: StoreHealth

    def _attempts(self, fn: Callable[[], Any], *, idempotent: bool) -> Any:
        """fn(), run again after a lost connection where the store can."""
        return fn()

    def probe(self) -> None:
        """Try the database once; self.health follows (aitbc.dbfaults)."""

    def _changed(self, old: JobRecord, new: JobRecord) -> None:
        if old.state != new.state and self.on_transition is not None:
            self.on_transition(new.workload, new.state)

    def _read(self) -> AbstractContextManager[Any]:
        raise NotImplementedError

    def _tx(self) -> AbstractContextManager[Any]:
        raise NotImplementedError

    def _notify(self, db: Any, rec: JobRecord) -> None:
        """Tell other replicas a job changed (no-op with one process)."""

    def _notify_miner(self, db: Any, miner_id: str) -> None:
        """Tell other replicas a miner's key changed (no-op with one process)."""

    def listen(
        self,
        on_change: Callable[[str, str], None],
        on_miner_key: Callable[[str], None] | None = None,
        on_resync: Callable[[], None] | None = None,
    ) -> None:
        """Call on_change(job_id, state) for job changes and
        on_miner_key(miner_id) for key changes made by other processes; a
        single-process store has none. on_resync() whenever the listener
        (re)connects: changes made while it was away were not announced,
        so the caller re-reads what it follows."""

    def close(self) -> None:
        raise NotImplementedError

    def _get(self, db: Any, job_id: str, *, lock: bool = False) -> JobRecord | None:
        row = db.execute(f"{_SELECT} WHERE job_id = ?{self.FOR_UPDATE if lock else ''}", (job_id,)).fetchone()
        return JobRecord(*row) if row else None

    @_idempotent
    def get(self, job_id: str) -> JobRecord | None:
        with self._read() as db:
            return self._get(db, job_id)

    @_idempotent
    def get_by_request(self, client_name: str, request_id: str) -> JobRecord | None:
        with self._read() as db:
            row = db.execute(
                f"{_SELECT} WHERE client_name = ? AND request_id = ?", (client_name, request_id)
            ).fetchone()
        return JobRecord(*row) if row else None

    @_idempotent
    def insert(self, rec: JobRecord) -> JobRecord:
        """Insert a new job; if (client, request_id) exists, return that one."""
        with self._tx() as db:
            db.execute(
                f"INSERT INTO jobs({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))}) "
                "ON CONFLICT (client_name, request_id) DO NOTHING",
                [getattr(rec, c) for c in _COLUMNS],
            )
            row = db.execute(
                f"{_SELECT} WHERE client_name = ? AND request_id = ?", (rec.client_name, rec.request_id)
            ).fetchone()
            stored = JobRecord(*row)
            if stored.job_id == rec.job_id:
                self._notify(db, stored)
            return stored

    @_idempotent
    def delete(self, job_id: str, state: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM jobs WHERE job_id = ? AND state = ?", (job_id, state))

    @_once
    def transition(
        self,
        job_id: str,
        *,
        from_states: Iterable[str],
        expect_lease: str | None = None,
        outbox: tuple[str, bytes] | None = None,
        run_deadline: float | None = None,
        **changes: Any,
    ) -> JobRecord | None:
        """Apply `changes` if the job is in one of `from_states` (and holds
        `expect_lease`, when given). Returns the new record, or None when the
        condition failed: someone else moved the job first, or the lease is
        stale. `run_deadline` records the new lease's run-time bound in the
        same commit."""
        unknown = set(changes) - set(_COLUMNS)
        assert not unknown, unknown
        with self._tx() as db:
            cur = self._get(db, job_id, lock=True)
            if cur is None or cur.state not in set(from_states):
                return None
            if expect_lease is not None and cur.lease_id != expect_lease:
                return None
            changes["update_time"] = now_iso()
            sets = ", ".join(f"{k} = ?" for k in changes)
            db.execute(f"UPDATE jobs SET {sets}, version = version + 1 WHERE job_id = ?", [*changes.values(), job_id])
            if outbox is not None:
                db.execute(
                    "INSERT INTO outbox(job_id, kind, payload) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                    (job_id, outbox[0], outbox[1]),
                )
            if run_deadline is not None:
                db.execute(
                    "INSERT INTO lease_bounds(lease_id, job_id, run_deadline) VALUES (?, ?, ?)",
                    (changes["lease_id"], job_id, run_deadline),
                )
            new = self._get(db, job_id)
            assert new is not None
            self._notify(db, new)
        self._changed(cur, new)
        return new

    @_idempotent
    def in_states(self, states: Iterable[str], limit: int = 1000) -> list[JobRecord]:
        states = list(states)
        with self._read() as db:
            rows = db.execute(
                f"{_SELECT} WHERE state IN ({', '.join('?' * len(states))}) ORDER BY create_time LIMIT ?",
                [*states, limit],
            ).fetchall()
        return [JobRecord(*r) for r in rows]

    @_idempotent
    def count_by_state(self) -> dict[tuple[str, str], int]:
        with self._read() as db:
            rows = db.execute("SELECT state, workload, COUNT(*) FROM jobs GROUP BY state, workload").fetchall()
        return {(r[0], r[1]): int(r[2]) for r in rows}

    @_idempotent
    def outbox_backlog(self) -> int:
        with self._read() as db:
            row = db.execute("SELECT COUNT(*) FROM outbox WHERE done = 0").fetchone()
        return int(row[0]) if row else 0

    @_idempotent
    def leased_by(self, miner_id: str) -> list[JobRecord]:
        with self._read() as db:
            rows = db.execute(f"{_SELECT} WHERE miner_id = ? AND state IN (?, ?)", (miner_id, *LEASED)).fetchall()
        return [JobRecord(*r) for r in rows]

    @_idempotent
    def live_leases(self) -> list[tuple[str, str, str, float, float]]:
        """(job id, lease id, miner id, lease deadline, run deadline or 0)
        of every leased job: what the lease clock reconciles with."""
        with self._read() as db:
            rows = db.execute(
                "SELECT j.job_id, j.lease_id, j.miner_id, j.lease_deadline, COALESCE(b.run_deadline, 0) "
                "FROM jobs j LEFT JOIN lease_bounds b ON b.lease_id = j.lease_id WHERE j.state IN (?, ?)",
                LEASED,
            ).fetchall()
        return [(r[0], r[1], r[2], float(r[3]), float(r[4])) for r in rows]

    @_idempotent
    def run_deadlines(self, lease_ids: Iterable[str]) -> dict[str, float]:
        ids = list(lease_ids)
        if not ids:
            return {}
        with self._read() as db:
            rows = db.execute(
                f"SELECT lease_id, run_deadline FROM lease_bounds WHERE lease_id IN ({', '.join('?' * len(ids))})",
                ids,
            ).fetchall()
        return {r[0]: float(r[1]) for r in rows}

    @_idempotent
    def forget_lease_bounds(self) -> int:
        """Drop the bounds of leases that ended (results, lapses, cancels)."""
        with self._tx() as db:
            cur = db.execute(
                "DELETE FROM lease_bounds WHERE lease_id NOT IN (SELECT lease_id FROM jobs WHERE state IN (?, ?))",
                LEASED,
            )
            return int(cur.rowcount)

    @_idempotent
    def expired(self, now: float, states: Iterable[str]) -> list[JobRecord]:
        states = list(states)
        with self._read() as db:
            rows = db.execute(
                f"{_SELECT} WHERE deadline > 0 AND deadline < ? AND state IN ({', '.join('?' * len(states))})",
                [now, *states],
            ).fetchall()
        return [JobRecord(*r) for r in rows]

    @_idempotent
    def list_for_client(
        self, client_name: str, states: list[str], before: tuple[str, str] | None, limit: int
    ) -> list[JobRecord]:
        sql = f"{_SELECT} WHERE client_name = ?"
        params: list[Any] = [client_name]
        if states:
            sql += f" AND state IN ({', '.join('?' * len(states))})"
            params += states
        if before is not None:
            sql += " AND (create_time, job_id) < (?, ?)"
            params += list(before)
        sql += " ORDER BY create_time DESC, job_id DESC LIMIT ?"
        params.append(limit)
        with self._read() as db:
            rows = db.execute(sql, params).fetchall()
        return [JobRecord(*r) for r in rows]

    @_idempotent
    def renew_leases(self, deadline: float) -> int:
        """Push every lease's deadline, and run-time bound, to at least
        `deadline`: its miner could deliver nothing while we were down."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE jobs SET lease_deadline = ? WHERE state IN (?, ?) AND lease_deadline < ?",
                (deadline, *LEASED, deadline),
            )
            db.execute("UPDATE lease_bounds SET run_deadline = ? WHERE run_deadline < ?", (deadline, deadline))
            return int(cur.rowcount)

    @_idempotent
    def extend_leases(self, miner_id: str, deadline: float) -> int:
        with self._tx() as db:
            cur = db.execute(
                "UPDATE jobs SET lease_deadline = ? WHERE miner_id = ? AND state IN (?, ?)",
                (deadline, miner_id, *LEASED),
            )
            return cur.rowcount

    # -- retention -------------------------------------------------------

    @_idempotent
    def expire_results(self, ended_before: str, limit: int) -> int:
        """Mark expired the results of up to `limit` jobs that ended before
        `ended_before` (ISO time); their update_time stays their end."""
        ended = sorted(TERMINAL)
        with self._tx() as db:
            ids = [
                r[0]
                for r in db.execute(
                    f"SELECT job_id FROM jobs WHERE result_expired = 0 AND state IN ({', '.join('?' * len(ended))}) "
                    "AND update_time < ? LIMIT ?",
                    [*ended, ended_before, limit],
                ).fetchall()
            ]
            if ids:
                db.execute(
                    f"UPDATE jobs SET result_expired = 1, version = version + 1 "
                    f"WHERE job_id IN ({', '.join('?' * len(ids))})",
                    ids,
                )
        return len(ids)

    @_idempotent
    def delete_finished(self, ended_before: str, limit: int) -> int:
        """Delete up to `limit` jobs that ended before `ended_before`, whose
        result expired and whose refund or payment was delivered, with their
        outbox rows."""
        ended = sorted(TERMINAL)
        with self._tx() as db:
            ids = [
                r[0]
                for r in db.execute(
                    f"SELECT job_id FROM jobs WHERE result_expired = 1 AND state IN ({', '.join('?' * len(ended))}) "
                    "AND update_time < ? AND NOT EXISTS "
                    "(SELECT 1 FROM outbox o WHERE o.job_id = jobs.job_id AND o.done = 0) LIMIT ?",
                    [*ended, ended_before, limit],
                ).fetchall()
            ]
            if ids:
                marks = ", ".join("?" * len(ids))
                for table in ("outbox", "lease_bounds", "jobs"):
                    db.execute(f"DELETE FROM {table} WHERE job_id IN ({marks})", ids)
        return len(ids)

    @_idempotent
    def referenced_blobs(self, digests: list[str]) -> set[str]:
        """Which of these blobs (hex) a job still needs: the output of one
        whose result is kept, or any run's output of one in progress."""
        if not digests:
            return set()
        open_states = [s for s in ALL_STATES if s not in TERMINAL]
        with self._read() as db:
            rows = db.execute(
                f"SELECT output_sha256 FROM jobs WHERE result_expired = 0 "
                f"AND output_sha256 IN ({', '.join('?' * len(digests))})",
                [bytes.fromhex(d) for d in digests],
            ).fetchall()
            runs = db.execute(
                f"SELECT runs FROM jobs WHERE state IN ({', '.join('?' * len(open_states))}) AND runs != '[]'",
                open_states,
            ).fetchall()
        needed = {bytes(r[0]).hex() for r in rows}
        for (text,) in runs:
            needed.update(r.get("output_sha256", "") for r in json.loads(text))
        return needed & set(digests)

    # -- miners ----------------------------------------------------------

    @_once
    def register_miner(self, miner_id: str, public_key: bytes, payout_address: str) -> tuple[bytes, bool]:
        """Trust the first key a miner id presents; return the registered
        key (which the caller compares with the one presented) and whether
        this call registered it."""
        with self._tx() as db:
            cur = db.execute(
                "INSERT INTO miners(miner_id, public_key, payout_address, first_seen) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (miner_id) DO NOTHING",
                (miner_id, public_key, payout_address, now_iso()),
            )
            created = int(cur.rowcount) == 1
            row = db.execute("SELECT public_key FROM miners WHERE miner_id = ?", (miner_id,)).fetchone()
            if bytes(row[0]) == public_key:
                db.execute("UPDATE miners SET payout_address = ? WHERE miner_id = ?", (payout_address, miner_id))
            return bytes(row[0]), created

    @_once
    def rotate_miner_key(self, miner_id: str, old: bytes, new: bytes) -> bool:
        """Compare-and-set the miner's key; False if `old` is not current."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE miners SET public_key = ? WHERE miner_id = ? AND public_key = ?", (new, miner_id, old)
            )
            if int(cur.rowcount) != 1:
                return False
            self._notify_miner(db, miner_id)
            return True

    @_idempotent
    def miner_key(self, miner_id: str) -> bytes | None:
        with self._read() as db:
            row = db.execute("SELECT public_key FROM miners WHERE miner_id = ?", (miner_id,)).fetchone()
        return bytes(row[0]) if row else None

    @_once
    def reset_miner_key(self, miner_id: str, new: bytes, request_id: str, by: str, reason: str) -> KeyReset | None:
        """Replace the miner's key whatever it is, once per request id.
        None if the miner id was never registered."""
        with self._tx() as db:
            # The row lock orders rival resets of one miner (PostgreSQL).
            row = db.execute(
                f"SELECT public_key FROM miners WHERE miner_id = ?{self.FOR_UPDATE}", (miner_id,)
            ).fetchone()
            if row is None:
                return None
            old = bytes(row[0])
            cur = db.execute(
                "INSERT INTO miner_key_resets(request_id, miner_id, old_key, new_key, by_name, reason, create_time) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (request_id) DO NOTHING",
                (request_id, miner_id, old, new, by, reason, now_iso()),
            )
            if int(cur.rowcount) != 1:
                prior = db.execute(
                    "SELECT miner_id, old_key, new_key FROM miner_key_resets WHERE request_id = ?", (request_id,)
                ).fetchone()
                same = (prior[0], bytes(prior[2])) == (miner_id, new)
                return KeyReset(bytes(prior[1]), bytes(prior[2]), applied=False, conflict=not same)
            db.execute("UPDATE miners SET public_key = ? WHERE miner_id = ?", (new, miner_id))
            self._notify_miner(db, miner_id)
            return KeyReset(old, new, applied=True)

    @_once
    def record_verdict(self, miner_id: str, accepted: bool) -> tuple[int, int]:
        """Count a verdict on the miner's result; return (accepted, refused)."""
        column = "accepted" if accepted else "refused"
        with self._tx() as db:
            db.execute(f"UPDATE miners SET {column} = {column} + 1 WHERE miner_id = ?", (miner_id,))
            row = db.execute("SELECT accepted, refused FROM miners WHERE miner_id = ?", (miner_id,)).fetchone()
        return (int(row[0]), int(row[1])) if row else (0, 0)

    @_idempotent
    def standing(self, miner_id: str) -> tuple[int, int]:
        with self._read() as db:
            row = db.execute("SELECT accepted, refused FROM miners WHERE miner_id = ?", (miner_id,)).fetchone()
        return (int(row[0]), int(row[1])) if row else (0, 0)

    # -- outbox ----------------------------------------------------------

    @_idempotent
    def due_outbox(self, now: float, limit: int = 100, latest: float = float("inf")) -> list[OutboxItem]:
        """Undelivered items due by `now`, and any scheduled after `latest`:
        no retry waits that long, so the clock that scheduled it was ahead
        of this one (a step back) and it is overdue."""
        with self._read() as db:
            rows = db.execute(
                "SELECT job_id, kind, payload, attempts FROM outbox WHERE done = 0 "
                "AND (next_attempt <= ? OR next_attempt > ?) ORDER BY next_attempt LIMIT ?",
                (now, latest, limit),
            ).fetchall()
        return [OutboxItem(r[0], r[1], bytes(r[2]), r[3]) for r in rows]

    @_once
    def outbox_retry(self, job_id: str, kind: str, next_attempt: float, error: str) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE outbox SET attempts = attempts + 1, next_attempt = ?, last_error = ? "
                "WHERE job_id = ? AND kind = ?",
                (next_attempt, error[:500], job_id, kind),
            )

    @_idempotent
    def outbox_done(self, job_id: str, kind: str, *, from_states: Iterable[str], **changes: Any) -> JobRecord | None:
        """Mark an outbox item delivered and move its job, in one commit."""
        states = list(from_states)
        with self._tx() as db:
            db.execute("UPDATE outbox SET done = 1 WHERE job_id = ? AND kind = ?", (job_id, kind))
            cur = self._get(db, job_id, lock=True)
            if cur is None:
                return None
            if cur.state in states:
                changes["update_time"] = now_iso()
                sets = ", ".join(f"{k} = ?" for k in changes)
                db.execute(
                    f"UPDATE jobs SET {sets}, version = version + 1 WHERE job_id = ?", [*changes.values(), job_id]
                )
            elif "hold_state" in changes:
                db.execute(
                    "UPDATE jobs SET hold_state = ?, update_time = ?, version = version + 1 WHERE job_id = ?",
                    (changes["hold_state"], now_iso(), job_id),
                )
            new = self._get(db, job_id)
            if new is not None:
                self._notify(db, new)
        if new is not None:
            self._changed(cur, new)
        return new


class SqliteJobStore(SqliteStore, JobStore):
    SCHEMA = SCHEMA
    SCHEMA_VERSION = 4

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        have = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
        for name, decl in ADDED_COLUMNS.items():
            if name not in have:
                self._db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {decl}")
        for sql in ADDED_INDEXES:
            self._db.execute(sql)

    def close(self) -> None:
        SqliteStore.close(self)


class _PgDb:
    """psycopg behind the sqlite3 call shape the store logic uses."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def execute(self, sql: str, params: Any = ()) -> Any:
        return self._conn.execute(sql.replace("?", "%s"), params)


class PostgresJobStore(JobStore):
    """Several coordinator replicas share one database. Transitions lock the
    job's row (SELECT … FOR UPDATE) for their compare-and-set, so a job is
    claimed by exactly one replica's miner; every change is announced with
    NOTIFY so the replica with a free miner wakes, and watchers on any
    replica see every state."""

    FOR_UPDATE = " FOR UPDATE"
    CHANNEL = "aitbc_jobs"
    # Payload: a miner id whose key was rotated or reset.
    MINER_CHANNEL = "aitbc_miner_keys"
    SCHEMA_LOCK = 0x41495443

    def __init__(self, dsn: str) -> None:
        import psycopg

        from aitbc.pg import PgConnections

        self._psycopg = psycopg
        with psycopg.connect(dsn, autocommit=True) as conn, conn.transaction(), conn.cursor() as cur:
            apply_postgres_schema(
                cur, SCHEMA, name="coordinator", version=SqliteJobStore.SCHEMA_VERSION, lock=self.SCHEMA_LOCK
            )
            for name, decl in ADDED_COLUMNS.items():
                cur.execute(f"ALTER TABLE jobs ADD COLUMN IF NOT EXISTS {name} {postgres_schema(decl)}")
            for sql in ADDED_INDEXES:
                cur.execute(sql)
        self.health = StoreHealth("coordinator")
        self._pg = PgConnections(dsn, name="coordinator", health=self.health, min_size=1, max_size=4)
        # LISTEN needs a connection of its own, held while it works; a pool
        # of one gives it the same reconnecting as the store's.
        self._listen_pg = PgConnections(dsn, name="coordinator-listen", health=self.health, max_size=1)
        self._listener: threading.Thread | None = None
        self._stopped = threading.Event()

    @contextmanager
    def _read(self) -> Iterator[_PgDb]:
        with self._pg.connection() as conn:
            yield _PgDb(conn)

    @contextmanager
    def _tx(self) -> Iterator[_PgDb]:
        with self._pg.transaction() as conn:
            yield _PgDb(conn)

    def _attempts(self, fn: Callable[[], Any], *, idempotent: bool) -> Any:
        return self._pg.run(fn, idempotent=idempotent)

    def probe(self) -> None:
        self._pg.probe()

    def _notify(self, db: Any, rec: JobRecord) -> None:
        db.execute("SELECT pg_notify(?, ?)", (self.CHANNEL, f"{rec.job_id}:{rec.state}"))

    def _notify_miner(self, db: Any, miner_id: str) -> None:
        db.execute("SELECT pg_notify(?, ?)", (self.MINER_CHANNEL, miner_id))

    def listen(
        self,
        on_change: Callable[[str, str], None],
        on_miner_key: Callable[[str], None] | None = None,
        on_resync: Callable[[], None] | None = None,
    ) -> None:
        from aitbc.dbfaults import StorageUnavailable

        def run() -> None:
            while not self._stopped.is_set():
                try:
                    with self._listen_pg.connection() as conn:
                        conn.execute(f"LISTEN {self.CHANNEL}")
                        conn.execute(f"LISTEN {self.MINER_CHANNEL}")
                        self.health.ok()
                        # Listening from here on; what changed before is
                        # the caller's to re-read.
                        if on_resync is not None:
                            on_resync()
                        while not self._stopped.is_set():
                            for note in conn.notifies(timeout=0.5):
                                if note.channel == self.MINER_CHANNEL:
                                    if on_miner_key is not None:
                                        on_miner_key(note.payload)
                                    continue
                                job_id, _, state = note.payload.partition(":")
                                on_change(job_id, state)
                except StorageUnavailable:
                    # The pool reconnects, with backoff; wait for it.
                    self._stopped.wait(0.1)

        self._listener = threading.Thread(target=run, name="job-notifications", daemon=True)
        self._listener.start()

    def close(self) -> None:
        self._stopped.set()
        if self._listener is not None:
            self._listener.join(timeout=5)
        self._listen_pg.close()
        self._pg.close()


def open_job_store(url: str) -> JobStore:
    """`postgresql://…` opens PostgreSQL; anything else is a SQLite path."""
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresJobStore(url)
    return SqliteJobStore(Path(url))
