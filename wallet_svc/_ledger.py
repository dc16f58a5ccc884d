"""The ledger: double-entry journal, balances, escrow holds, transfers.

Every movement is one transaction of postings that sum to zero; new money
comes from the ISSUANCE pseudo-account, whose balance is minus everything
minted. So at all times: sum(available + held) over real accounts == minted,
and `check()` recomputes every balance from the journal to prove it.

The logic here runs inside one database transaction handed in as a `Tx`
(SQLite or PostgreSQL, see _stores.py); it never commits. Arithmetic is done
in Python and bounded to int64 before it is written: SQLite silently turns an
overflowing integer into a float.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from aitbc.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound

INT64_MAX = 2**63 - 1
ISSUANCE = "@issuance"

HELD, SETTLED, RELEASED = "HELD", "SETTLED", "RELEASED"


class Tx(Protocol):
    """One open database transaction; SQL uses "?" placeholders."""

    def one(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None: ...
    def all(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]: ...
    def run(self, sql: str, params: Sequence[Any] = ()) -> int: ...


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
    # Other miners paid from the same hold (redundant verification).
    co_payouts: tuple[tuple[str, int], ...] = ()

    @property
    def to_miners(self) -> int:
        return self.miner_amount + sum(amount for _, amount in self.co_payouts)


@dataclass(frozen=True)
class Transfer:
    from_address: str
    to_address: str
    amount: int
    request_id: str
    digest: bytes  # sha256 of the signed transfer body


@dataclass(frozen=True)
class Entry:
    """One journal transaction as one account sees it."""

    txn_id: int
    kind: str
    available_delta: int
    held_delta: int
    counterparty: str
    job_id: str
    create_time: str


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def check_amount(amount: int, field: str = "amount") -> int:
    if amount <= 0:
        raise InvalidArgument(f"{field} must be positive, got {amount}", field=field, reason="BAD_AMOUNT")
    if amount > INT64_MAX:
        raise InvalidArgument(f"{field} exceeds int64", field=field, reason="BAD_AMOUNT")
    return amount


_HOLD_COLUMNS = (
    "job_id, address, amount, state, miner_address, miner_amount, fee_amount, "
    "refunded_amount, settlement_sha256, create_time, close_time"
)


def _hold(row: tuple[Any, ...] | None) -> Hold | None:
    if row is None:
        return None
    values = list(row)
    values[8] = bytes(values[8]) if values[8] is not None else None
    return Hold(*values)


class Ledger:
    def __init__(self, treasury_address: str) -> None:
        self.treasury = treasury_address

    # -- reads ---------------------------------------------------------------

    @staticmethod
    def balance(tx: Tx, address: str) -> Balance:
        row = tx.one("SELECT available, held FROM balances WHERE address = ?", (address,))
        return Balance(address, int(row[0]), int(row[1])) if row else Balance(address, 0, 0)

    @staticmethod
    def minted(tx: Tx) -> int:
        row = tx.one("SELECT minted FROM supply WHERE id = 1")
        return int(row[0]) if row else 0

    @staticmethod
    def issued(tx: Tx) -> int:
        """Everything minted, according to the journal."""
        row = tx.one("SELECT COALESCE(SUM(amount), 0) FROM postings WHERE address = ?", (ISSUANCE,))
        return -int(row[0]) if row else 0

    @staticmethod
    def get_hold(tx: Tx, job_id: str) -> Hold | None:
        return _hold(tx.one(f"SELECT {_HOLD_COLUMNS} FROM holds WHERE job_id = ?", (job_id,)))

    @staticmethod
    def history(tx: Tx, address: str, before_txn: int | None, limit: int) -> list[Entry]:
        rows = tx.all(
            "SELECT t.id, t.kind, "
            "SUM(CASE WHEN p.bucket = 'available' THEN p.amount ELSE 0 END), "
            "SUM(CASE WHEN p.bucket = 'held' THEN p.amount ELSE 0 END), "
            "MAX(p.counterparty), COALESCE(t.job_id, ''), t.create_time "
            "FROM postings p JOIN txns t ON t.id = p.txn_id "
            "WHERE p.address = ? AND t.id < ? "
            "GROUP BY t.id, t.kind, t.job_id, t.create_time ORDER BY t.id DESC LIMIT ?",
            (address, before_txn if before_txn is not None else INT64_MAX, limit),
        )
        return [Entry(int(r[0]), r[1], int(r[2]), int(r[3]), r[4] or "", r[5], r[6]) for r in rows]

    # -- writes --------------------------------------------------------------

    @staticmethod
    def create_account(tx: Tx, address: str, public_key: bytes) -> str:
        if tx.one("SELECT address FROM accounts WHERE public_key = ?", (public_key,)) is None:
            tx.run(
                "INSERT INTO accounts(address, public_key, create_time) VALUES (?, ?, ?)",
                (address, public_key, _now()),
            )
        return address

    def _post(
        self,
        tx: Tx,
        kind: str,
        postings: list[tuple[str, str, int, str]],
        *,
        job_id: str | None = None,
        request_id: str | None = None,
        body_sha256: bytes | None = None,
    ) -> int:
        """Write one balanced transaction (address, bucket, amount,
        counterparty) and apply it to the balances. Returns its id.

        Balances change in SQL (`x = x + delta`), never by writing back a
        value read earlier, so concurrent writers on PostgreSQL cannot lose
        an update; a debit only applies if it leaves the bucket >= 0.
        Accounts are touched in address order, so two transactions never
        wait on each other in a cycle. No balance can overflow: all of them
        together never exceed the supply, which mint() bounds to int64.
        """
        assert sum(p[2] for p in postings) == 0, "unbalanced transaction"
        row = tx.one(
            "INSERT INTO txns(kind, job_id, request_id, body_sha256, create_time) VALUES (?, ?, ?, ?, ?) RETURNING id",
            (kind, job_id, request_id, body_sha256, _now()),
        )
        assert row is not None
        txn_id = int(row[0])
        for address, bucket, amount, counterparty in sorted(postings):
            if amount == 0:
                continue
            tx.run(
                "INSERT INTO postings(txn_id, address, bucket, amount, counterparty) VALUES (?, ?, ?, ?, ?)",
                (txn_id, address, bucket, amount, counterparty),
            )
            if address == ISSUANCE:
                continue
            assert bucket in ("available", "held")
            if amount < 0:
                debited = tx.run(
                    f"UPDATE balances SET {bucket} = {bucket} + ? WHERE address = ? AND {bucket} >= ?",
                    (amount, address, -amount),
                )
                if debited != 1:
                    raise FailedPrecondition(
                        f"insufficient funds in {address}",
                        reason="INSUFFICIENT_FUNDS",
                        metadata={"address": address},
                    )
            else:
                tx.run(
                    f"INSERT INTO balances(address, available, held) VALUES (?, ?, ?) ON CONFLICT(address) "
                    f"DO UPDATE SET {bucket} = balances.{bucket} + excluded.{bucket}",
                    (address, amount if bucket == "available" else 0, amount if bucket == "held" else 0),
                )
        return txn_id

    def mint(self, tx: Tx, address: str, amount: int, request_id: str) -> Balance:
        check_amount(amount)
        if not request_id:
            raise InvalidArgument("request_id is required for Mint", field="request_id")
        key = f"mint:{request_id}"
        prior = tx.one(
            "SELECT p.address, p.amount FROM txns t JOIN postings p ON p.txn_id = t.id "
            "WHERE t.request_id = ? AND p.address != ?",
            (key, ISSUANCE),
        )
        if prior is not None:
            if (prior[0], int(prior[1])) != (address, amount):
                raise AlreadyExists(
                    "request_id was already used for a different mint", field="request_id", reason="REQUEST_ID_REUSED"
                )
            return self.balance(tx, address)
        # The supply row bounds all money to int64 (and serialises mints).
        raised = tx.run(
            "UPDATE supply SET minted = minted + ? WHERE id = 1 AND minted <= ? - ?", (amount, INT64_MAX, amount)
        )
        if raised != 1:
            raise FailedPrecondition("total supply would overflow int64", reason="OVERFLOW")
        self._post(
            tx,
            "mint",
            [(ISSUANCE, "available", -amount, address), (address, "available", amount, ISSUANCE)],
            request_id=key,
        )
        return self.balance(tx, address)

    def transfer(self, tx: Tx, t: Transfer) -> tuple[int, Balance]:
        check_amount(t.amount)
        if t.from_address == t.to_address:
            raise InvalidArgument("sender and receiver are the same account", field="to_address")
        key = f"transfer:{t.from_address}:{t.request_id}"
        prior = tx.one("SELECT id, body_sha256 FROM txns WHERE request_id = ?", (key,))
        if prior is not None:
            if bytes(prior[1]) != t.digest:
                raise AlreadyExists(
                    "request_id was already used for a different transfer",
                    field="request_id",
                    reason="REQUEST_ID_REUSED",
                )
            return int(prior[0]), self.balance(tx, t.from_address)
        txn_id = self._post(
            tx,
            "transfer",
            [
                (t.from_address, "available", -t.amount, t.to_address),
                (t.to_address, "available", t.amount, t.from_address),
            ],
            request_id=key,
            body_sha256=t.digest,
        )
        return txn_id, self.balance(tx, t.from_address)

    def place_hold(self, tx: Tx, job_id: str, address: str, amount: int) -> Hold:
        check_amount(amount)
        if not job_id:
            raise InvalidArgument("job_id is required", field="job_id")
        prior = self.get_hold(tx, job_id)
        if prior is not None:
            if (prior.address, prior.amount) != (address, amount):
                raise AlreadyExists(f"job {job_id} already has a different hold", field="job_id", reason="HOLD_EXISTS")
            return prior
        tx.run(
            "INSERT INTO holds(job_id, address, amount, state, create_time) VALUES (?, ?, ?, ?, ?)",
            (job_id, address, amount, HELD, _now()),
        )
        self._post(tx, "hold", [(address, "available", -amount, ""), (address, "held", amount, "")], job_id=job_id)
        hold = self.get_hold(tx, job_id)
        assert hold is not None
        return hold

    def settle_hold(self, tx: Tx, s: Settlement) -> Hold:
        hold = _hold(tx.one(f"SELECT {_HOLD_COLUMNS} FROM holds WHERE job_id = ?", (s.job_id,)))
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
        if s.miner_amount < 0 or s.fee_amount < 0 or any(amount <= 0 for _, amount in s.co_payouts):
            raise InvalidArgument("settlement amounts must not be negative", field="settlement", reason="BAD_AMOUNT")
        # Python ints do not overflow; the hold bound below keeps it in int64.
        paid = s.to_miners + s.fee_amount
        if paid > hold.amount:
            raise FailedPrecondition(
                f"settlement pays {paid} but the hold is {hold.amount}", reason="SETTLEMENT_EXCEEDS_HOLD"
            )
        # Claim the hold first: under PostgreSQL a concurrent settlement of
        # the same job then conflicts here instead of paying twice.
        claimed = tx.run(
            "UPDATE holds SET state = ?, miner_address = ?, miner_amount = ?, fee_amount = ?, "
            "refunded_amount = ?, settlement_sha256 = ?, close_time = ? WHERE job_id = ? AND state = ?",
            (
                SETTLED,
                s.miner_address,
                s.to_miners,
                s.fee_amount,
                hold.amount - paid,
                s.digest,
                _now(),
                s.job_id,
                HELD,
            ),
        )
        if claimed != 1:
            # Another writer closed the hold while we waited for its row:
            # answer as if we had come second, which we did.
            return self.settle_hold(tx, s)
        self._post(
            tx,
            "settle",
            [
                (hold.address, "held", -hold.amount, s.miner_address),
                (s.miner_address, "available", s.miner_amount, hold.address),
                *((address, "available", amount, hold.address) for address, amount in s.co_payouts),
                (self.treasury, "available", s.fee_amount, hold.address),
                (hold.address, "available", hold.amount - paid, ""),
            ],
            job_id=s.job_id,
        )
        settled = self.get_hold(tx, s.job_id)
        assert settled is not None
        return settled

    def release_hold(self, tx: Tx, job_id: str) -> Hold:
        hold = self.get_hold(tx, job_id)
        if hold is None:
            raise NotFound(f"no hold for job {job_id}", reason="HOLD_NOT_FOUND")
        if hold.state == RELEASED:
            return hold
        if hold.state == SETTLED:
            raise FailedPrecondition(f"job {job_id}'s hold was settled", reason="ALREADY_SETTLED")
        claimed = tx.run(
            "UPDATE holds SET state = ?, refunded_amount = amount, close_time = ? WHERE job_id = ? AND state = ?",
            (RELEASED, _now(), job_id, HELD),
        )
        if claimed != 1:
            return self.release_hold(tx, job_id)
        self._post(
            tx,
            "release",
            [(hold.address, "held", -hold.amount, ""), (hold.address, "available", hold.amount, "")],
            job_id=job_id,
        )
        released = self.get_hold(tx, job_id)
        assert released is not None
        return released

    # -- audit ---------------------------------------------------------------

    def check(self, tx: Tx) -> list[str]:
        """Recompute every balance from the journal; return the differences
        (empty when the books are clean)."""
        problems: list[str] = []
        for txn_id, total in tx.all("SELECT txn_id, SUM(amount) FROM postings GROUP BY txn_id HAVING SUM(amount) != 0"):
            problems.append(f"transaction {txn_id} is unbalanced by {total}")
        derived: dict[str, list[int]] = {}
        for address, bucket, total in tx.all(
            "SELECT address, bucket, SUM(amount) FROM postings WHERE address != ? GROUP BY address, bucket",
            (ISSUANCE,),
        ):
            derived.setdefault(address, [0, 0])[0 if bucket == "available" else 1] = int(total)
        stored = {a: [int(av), int(h)] for a, av, h in tx.all("SELECT address, available, held FROM balances")}
        for address in sorted(set(derived) | set(stored)):
            d = derived.get(address, [0, 0])
            s = stored.get(address, [0, 0])
            if d != s:
                problems.append(f"{address}: journal says {d}, balance says {s}")
            if min(s) < 0 or min(d) < 0:
                problems.append(f"{address}: negative balance {s}")
        total = sum(av + h for av, h in stored.values())
        minted, issued = self.minted(tx), self.issued(tx)
        if total != minted:
            problems.append(f"balances sum to {total} but {minted} was minted")
        if issued != minted:
            problems.append(f"the journal issued {issued} but the supply says {minted}")
        row = tx.one("SELECT COALESCE(SUM(amount), 0) FROM holds WHERE state = ?", (HELD,))
        open_holds = int(row[0]) if row else 0
        all_held = sum(h for _, h in stored.values())
        if open_holds != all_held:
            problems.append(f"open holds total {open_holds} but held balances total {all_held}")
        for job_id, n in tx.all(
            "SELECT job_id, COUNT(*) FROM txns WHERE kind = 'settle' GROUP BY job_id HAVING COUNT(*) > 1"
        ):
            problems.append(f"job {job_id} was settled {n} times")
        for job_id, n in tx.all(
            "SELECT job_id, COUNT(*) FROM txns WHERE kind IN ('settle', 'release') GROUP BY job_id HAVING COUNT(*) > 1"
        ):
            problems.append(f"job {job_id} was closed {n} times")
        return problems
