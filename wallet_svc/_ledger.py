"""The ledger: double-entry journal, balances, escrow holds. SQLite store.

Every movement is one transaction of postings that sum to zero; new money
comes from the ISSUANCE pseudo-account, whose balance is minus everything
minted. So at all times: sum(available + held) over real accounts == minted,
and `check()` recomputes every balance from the journal to prove it.

Arithmetic is done in Python and bounded to int64 before it is written:
SQLite silently turns an overflowing integer into a float.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from aitbc.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from aitbc.sqlite import SqliteStore

INT64_MAX = 2**63 - 1
ISSUANCE = "@issuance"

HELD, SETTLED, RELEASED = "HELD", "SETTLED", "RELEASED"

T = TypeVar("T")

SCHEMA = """
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
    create_time TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS postings (
    txn_id  INTEGER NOT NULL REFERENCES txns(id),
    address TEXT NOT NULL,
    bucket  TEXT NOT NULL CHECK (bucket IN ('available', 'held')),
    amount  INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS postings_by_address ON postings(address);
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


@dataclass(frozen=True)
class Balance:
    address: str
    available: int
    held: int


@dataclass(frozen=True)
class Hold:
    job_id: str
    address: str
    amount: int
    state: str
    miner_address: str | None
    miner_amount: int
    fee_amount: int
    refunded_amount: int
    settlement_sha256: bytes | None
    create_time: str
    close_time: str | None


@dataclass(frozen=True)
class Settlement:
    """The fields of a coordinator-signed settlement the ledger acts on."""

    job_id: str
    client_address: str
    miner_address: str
    hold_amount: int
    miner_amount: int
    fee_amount: int
    digest: bytes  # sha256 of the signed settlement body: the idempotency check


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def check_amount(amount: int, field: str = "amount") -> int:
    if amount <= 0:
        raise InvalidArgument(f"{field} must be positive, got {amount}", field=field, reason="BAD_AMOUNT")
    if amount > INT64_MAX:
        raise InvalidArgument(f"{field} exceeds int64", field=field, reason="BAD_AMOUNT")
    return amount


class SqliteLedger(SqliteStore):
    """One connection, serialised by a lock; commits are durable (WAL with
    synchronous=FULL) before a method returns."""

    SCHEMA = SCHEMA

    def __init__(self, path: Path, treasury_address: str) -> None:
        super().__init__(path)
        self.treasury = treasury_address

    def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        with self._lock:
            return fn(self._db)

    # -- accounts and balances -------------------------------------------

    def create_account(self, address: str, public_key: bytes) -> str:
        with self._tx() as db:
            row = db.execute("SELECT address FROM accounts WHERE public_key = ?", (public_key,)).fetchone()
            if row is None:
                db.execute(
                    "INSERT INTO accounts(address, public_key, create_time) VALUES (?, ?, ?)",
                    (address, public_key, _now()),
                )
        return address

    def balance(self, address: str) -> Balance:
        return self._read(lambda db: self._balance(db, address))

    @staticmethod
    def _balance(db: sqlite3.Connection, address: str) -> Balance:
        row = db.execute("SELECT available, held FROM balances WHERE address = ?", (address,)).fetchone()
        return Balance(address, row[0], row[1]) if row else Balance(address, 0, 0)

    def _post(
        self,
        db: sqlite3.Connection,
        kind: str,
        postings: list[tuple[str, str, int]],
        *,
        job_id: str | None = None,
        request_id: str | None = None,
    ) -> None:
        """Write one balanced transaction and apply it to the balances."""
        assert sum(p[2] for p in postings) == 0, "unbalanced transaction"
        cur = db.execute(
            "INSERT INTO txns(kind, job_id, request_id, create_time) VALUES (?, ?, ?, ?)",
            (kind, job_id, request_id, _now()),
        )
        txn_id = cur.lastrowid
        for address, bucket, amount in postings:
            if amount == 0:
                continue
            db.execute(
                "INSERT INTO postings(txn_id, address, bucket, amount) VALUES (?, ?, ?, ?)",
                (txn_id, address, bucket, amount),
            )
            if address == ISSUANCE:
                continue
            bal = self._balance(db, address)
            available = bal.available + (amount if bucket == "available" else 0)
            held = bal.held + (amount if bucket == "held" else 0)
            if available < 0 or held < 0:
                raise FailedPrecondition(
                    f"insufficient funds in {address}", reason="INSUFFICIENT_FUNDS", metadata={"address": address}
                )
            if available > INT64_MAX or held > INT64_MAX:
                raise FailedPrecondition("balance would overflow int64", reason="OVERFLOW")
            db.execute(
                "INSERT INTO balances(address, available, held) VALUES (?, ?, ?) "
                "ON CONFLICT(address) DO UPDATE SET available = excluded.available, held = excluded.held",
                (address, available, held),
            )

    def minted(self) -> int:
        return self._read(self._minted)

    @staticmethod
    def _minted(db: sqlite3.Connection) -> int:
        row = db.execute("SELECT COALESCE(SUM(amount), 0) FROM postings WHERE address = ?", (ISSUANCE,)).fetchone()
        return -int(row[0])

    def mint(self, address: str, amount: int, request_id: str) -> Balance:
        check_amount(amount)
        if not request_id:
            raise InvalidArgument("request_id is required for Mint", field="request_id")
        key = f"mint:{request_id}"
        with self._tx() as db:
            prior = db.execute(
                "SELECT p.address, p.amount FROM txns t JOIN postings p ON p.txn_id = t.id "
                "WHERE t.request_id = ? AND p.address != ?",
                (key, ISSUANCE),
            ).fetchone()
            if prior is not None:
                if (prior[0], prior[1]) != (address, amount):
                    raise AlreadyExists(
                        "request_id was already used for a different mint",
                        field="request_id",
                        reason="REQUEST_ID_REUSED",
                    )
                return self._balance(db, address)
            if self._minted(db) + amount > INT64_MAX:
                raise FailedPrecondition("total supply would overflow int64", reason="OVERFLOW")
            self._post(db, "mint", [(ISSUANCE, "available", -amount), (address, "available", amount)], request_id=key)
            return self._balance(db, address)

    # -- holds -----------------------------------------------------------

    @staticmethod
    def _hold(db: sqlite3.Connection, job_id: str) -> Hold | None:
        row = db.execute(
            "SELECT job_id, address, amount, state, miner_address, miner_amount, fee_amount, "
            "refunded_amount, settlement_sha256, create_time, close_time FROM holds WHERE job_id = ?",
            (job_id,),
        ).fetchone()
        return Hold(*row) if row else None

    def get_hold(self, job_id: str) -> Hold | None:
        return self._read(lambda db: self._hold(db, job_id))

    def place_hold(self, job_id: str, address: str, amount: int) -> Hold:
        check_amount(amount)
        if not job_id:
            raise InvalidArgument("job_id is required", field="job_id")
        with self._tx() as db:
            prior = self._hold(db, job_id)
            if prior is not None:
                if (prior.address, prior.amount) != (address, amount):
                    raise AlreadyExists(
                        f"job {job_id} already has a different hold", field="job_id", reason="HOLD_EXISTS"
                    )
                return prior
            self._post(db, "hold", [(address, "available", -amount), (address, "held", amount)], job_id=job_id)
            db.execute(
                "INSERT INTO holds(job_id, address, amount, state, create_time) VALUES (?, ?, ?, ?, ?)",
                (job_id, address, amount, HELD, _now()),
            )
            hold = self._hold(db, job_id)
            assert hold is not None
            return hold

    def settle_hold(self, s: Settlement) -> Hold:
        with self._tx() as db:
            hold = self._hold(db, s.job_id)
            if hold is None:
                raise NotFound(f"no hold for job {s.job_id}", reason="HOLD_NOT_FOUND")
            if hold.state == SETTLED:
                if hold.settlement_sha256 == s.digest:
                    return hold
                raise FailedPrecondition(f"job {s.job_id} was already settled differently", reason="ALREADY_SETTLED")
            if hold.state == RELEASED:
                raise FailedPrecondition(f"job {s.job_id}'s hold was released", reason="HOLD_RELEASED")
            if s.client_address != hold.address:
                raise FailedPrecondition("settlement names another client than the hold", reason="HOLD_MISMATCH")
            if s.hold_amount != hold.amount:
                raise FailedPrecondition("settlement names another hold amount", reason="HOLD_MISMATCH")
            if s.miner_amount < 0 or s.fee_amount < 0:
                raise InvalidArgument(
                    "settlement amounts must not be negative", field="settlement", reason="BAD_AMOUNT"
                )
            paid = s.miner_amount + s.fee_amount
            if paid > hold.amount:
                raise FailedPrecondition(
                    f"settlement pays {paid} but the hold is {hold.amount}", reason="SETTLEMENT_EXCEEDS_HOLD"
                )
            refund = hold.amount - paid
            self._post(
                db,
                "settle",
                [
                    (hold.address, "held", -hold.amount),
                    (s.miner_address, "available", s.miner_amount),
                    (self.treasury, "available", s.fee_amount),
                    (hold.address, "available", refund),
                ],
                job_id=s.job_id,
            )
            db.execute(
                "UPDATE holds SET state = ?, miner_address = ?, miner_amount = ?, fee_amount = ?, "
                "refunded_amount = ?, settlement_sha256 = ?, close_time = ? WHERE job_id = ?",
                (SETTLED, s.miner_address, s.miner_amount, s.fee_amount, refund, s.digest, _now(), s.job_id),
            )
            settled = self._hold(db, s.job_id)
            assert settled is not None
            return settled

    def release_hold(self, job_id: str) -> Hold:
        with self._tx() as db:
            hold = self._hold(db, job_id)
            if hold is None:
                raise NotFound(f"no hold for job {job_id}", reason="HOLD_NOT_FOUND")
            if hold.state == RELEASED:
                return hold
            if hold.state == SETTLED:
                raise FailedPrecondition(f"job {job_id}'s hold was settled", reason="ALREADY_SETTLED")
            self._post(
                db,
                "release",
                [(hold.address, "held", -hold.amount), (hold.address, "available", hold.amount)],
                job_id=job_id,
            )
            db.execute(
                "UPDATE holds SET state = ?, refunded_amount = amount, close_time = ? WHERE job_id = ?",
                (RELEASED, _now(), job_id),
            )
            released = self._hold(db, job_id)
            assert released is not None
            return released

    # -- audit -----------------------------------------------------------

    def check(self) -> list[str]:
        """Recompute every balance from the journal; return the differences
        (empty when the books are clean)."""

        def run(db: sqlite3.Connection) -> list[str]:
            problems: list[str] = []
            for txn_id, total in db.execute(
                "SELECT txn_id, SUM(amount) FROM postings GROUP BY txn_id HAVING SUM(amount) != 0"
            ):
                problems.append(f"transaction {txn_id} is unbalanced by {total}")
            derived: dict[str, list[int]] = {}
            for address, bucket, total in db.execute(
                "SELECT address, bucket, SUM(amount) FROM postings WHERE address != ? GROUP BY address, bucket",
                (ISSUANCE,),
            ):
                derived.setdefault(address, [0, 0])[0 if bucket == "available" else 1] = int(total)
            stored = {a: [av, h] for a, av, h in db.execute("SELECT address, available, held FROM balances")}
            for address in sorted(set(derived) | set(stored)):
                d = derived.get(address, [0, 0])
                s = stored.get(address, [0, 0])
                if d != s:
                    problems.append(f"{address}: journal says {d}, balance says {s}")
                if min(s) < 0:
                    problems.append(f"{address}: negative balance {s}")
            total = sum(av + h for av, h in stored.values())
            minted = self._minted(db)
            if total != minted:
                problems.append(f"balances sum to {total} but {minted} was minted")
            held = db.execute("SELECT COALESCE(SUM(amount), 0) FROM holds WHERE state = ?", (HELD,)).fetchone()[0]
            all_held = sum(h for _, h in stored.values())
            if held != all_held:
                problems.append(f"open holds total {held} but held balances total {all_held}")
            for job_id, n in db.execute(
                "SELECT job_id, COUNT(*) FROM txns WHERE kind = 'settle' GROUP BY job_id HAVING COUNT(*) > 1"
            ):
                problems.append(f"job {job_id} was settled {n} times")
            return problems

        return self._read(run)
