"""The ledger never creates, loses or double-pays money."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as stt
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from aitbc.addresses import address_of
from aitbc.crypto import KeyPair
from aitbc.errors import AitbcError, AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from wallet_svc._ledger import INT64_MAX, SETTLED, Settlement, SqliteLedger


def addr() -> str:
    return address_of(KeyPair.generate().public_key)


@pytest.fixture
def ledger(tmp_path: Path) -> SqliteLedger:
    return SqliteLedger(tmp_path / "w.sqlite", treasury_address=addr())


def settlement(job: str, client: str, miner: str, hold: int, pay: int, fee: int, tag: bytes = b"1") -> Settlement:
    return Settlement(job, client, miner, hold, pay, fee, digest=job.encode() + tag)


def test_hold_settle_moves_exactly_the_price(ledger: SqliteLedger) -> None:
    client, miner = addr(), addr()
    ledger.mint(client, 10_000, "m1")
    ledger.place_hold("job1", client, 5_000)
    assert ledger.balance(client).available == 5_000 and ledger.balance(client).held == 5_000
    hold = ledger.settle_hold(settlement("job1", client, miner, 5_000, 900, 100))
    assert (hold.state, hold.miner_amount, hold.fee_amount, hold.refunded_amount) == (SETTLED, 900, 100, 4_000)
    assert ledger.balance(client).available == 9_000 and ledger.balance(client).held == 0
    assert ledger.balance(miner).available == 900
    assert ledger.balance(ledger.treasury).available == 100
    assert ledger.check() == []


def test_every_operation_is_idempotent(ledger: SqliteLedger) -> None:
    client, miner = addr(), addr()
    assert ledger.mint(client, 100, "m") == ledger.mint(client, 100, "m")
    with pytest.raises(AlreadyExists):
        ledger.mint(client, 101, "m")
    assert ledger.place_hold("j", client, 60) == ledger.place_hold("j", client, 60)
    with pytest.raises(AlreadyExists):
        ledger.place_hold("j", client, 61)
    s = settlement("j", client, miner, 60, 50, 5)
    assert ledger.settle_hold(s) == ledger.settle_hold(s)
    with pytest.raises(FailedPrecondition, match="settled differently"):
        ledger.settle_hold(settlement("j", client, miner, 60, 50, 5, tag=b"2"))
    with pytest.raises(FailedPrecondition):
        ledger.release_hold("j")
    assert ledger.balance(miner).available == 50
    assert ledger.minted() == 100
    assert ledger.check() == []


def test_release_then_settle_is_refused(ledger: SqliteLedger) -> None:
    client = addr()
    ledger.mint(client, 100, "m")
    ledger.place_hold("j", client, 100)
    assert ledger.release_hold("j") == ledger.release_hold("j")
    with pytest.raises(FailedPrecondition, match="released"):
        ledger.settle_hold(settlement("j", client, addr(), 100, 10, 0))
    assert ledger.balance(client).available == 100


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda lg, c: lg.mint(c, 0, "r"), InvalidArgument),
        (lambda lg, c: lg.mint(c, -5, "r"), InvalidArgument),
        (lambda lg, c: lg.mint(c, INT64_MAX + 1, "r"), InvalidArgument),
        (lambda lg, c: lg.mint(c, 5, ""), InvalidArgument),
        (lambda lg, c: lg.place_hold("j", c, 101), FailedPrecondition),
        (lambda lg, c: lg.place_hold("j", c, -1), InvalidArgument),
        (lambda lg, c: lg.place_hold("", c, 1), InvalidArgument),
        (lambda lg, c: lg.release_hold("nope"), NotFound),
        (lambda lg, c: lg.mint(c, INT64_MAX - 50, "r"), FailedPrecondition),
    ],
)
def test_bad_amounts_change_nothing(ledger: SqliteLedger, call: object, error: type[AitbcError]) -> None:
    client = addr()
    ledger.mint(client, 100, "seed")
    with pytest.raises(error):
        call(ledger, client)  # type: ignore[operator]
    assert ledger.balance(client).available == 100
    assert ledger.minted() == 100
    assert ledger.check() == []


def test_settlement_cannot_exceed_or_mismatch_the_hold(ledger: SqliteLedger) -> None:
    client, other = addr(), addr()
    ledger.mint(client, 100, "m")
    ledger.place_hold("j", client, 100)
    for bad in (
        settlement("j", client, addr(), 100, 90, 11),
        settlement("j", other, addr(), 100, 1, 0),
        settlement("j", client, addr(), 99, 1, 0),
        settlement("nope", client, addr(), 100, 1, 0),
    ):
        with pytest.raises((FailedPrecondition, NotFound)):
            ledger.settle_hold(bad)
    assert ledger.get_hold("j").state == "HELD"  # type: ignore[union-attr]
    assert ledger.check() == []


def test_check_finds_a_tampered_balance(tmp_path: Path) -> None:
    ledger = SqliteLedger(tmp_path / "w.sqlite", addr())
    client = addr()
    ledger.mint(client, 100, "m")
    ledger.close()
    db = sqlite3.connect(tmp_path / "w.sqlite")
    db.execute("UPDATE balances SET available = 1000 WHERE address = ?", (client,))
    db.commit()
    db.close()
    problems = SqliteLedger(tmp_path / "w.sqlite", addr()).check()
    assert any("journal says [100, 0]" in p for p in problems)
    assert any("minted" in p for p in problems)


class LedgerMachine(RuleBasedStateMachine):
    """Random mint / hold / settle / release / retries; the books must
    balance after every step."""

    def __init__(self) -> None:
        super().__init__()
        import tempfile

        self.dir = tempfile.TemporaryDirectory()
        self.ledger = SqliteLedger(Path(self.dir.name) / "w.sqlite", addr())
        self.accounts = [addr() for _ in range(3)]
        self.minted = 0
        self.jobs: dict[str, tuple[str, int]] = {}
        self.settled: dict[str, Settlement] = {}
        self.n = 0

    def teardown(self) -> None:
        self.ledger.close()
        self.dir.cleanup()

    @rule(who=stt.integers(0, 2), amount=stt.integers(1, 10_000), retry=stt.booleans())
    def mint(self, who: int, amount: int, retry: bool) -> None:
        self.n += 1
        rid = f"r{self.n}"
        self.ledger.mint(self.accounts[who], amount, rid)
        if retry:
            self.ledger.mint(self.accounts[who], amount, rid)
        self.minted += amount

    @rule(who=stt.integers(0, 2), amount=stt.integers(1, 5_000))
    def hold(self, who: int, amount: int) -> None:
        self.n += 1
        job = f"j{self.n}"
        try:
            self.ledger.place_hold(job, self.accounts[who], amount)
        except FailedPrecondition:
            return
        self.jobs[job] = (self.accounts[who], amount)

    @precondition(lambda self: bool(self.jobs))
    @rule(data=stt.data(), miner=stt.integers(0, 2), retry=stt.booleans())
    def settle(self, data: stt.DataObject, miner: int, retry: bool) -> None:
        job = data.draw(stt.sampled_from(sorted(self.jobs)))
        client, amount = self.jobs[job]
        pay = data.draw(stt.integers(0, amount))
        fee = data.draw(stt.integers(0, amount - pay))
        s = settlement(job, client, self.accounts[miner], amount, pay, fee)
        try:
            self.ledger.settle_hold(s)
            if retry:
                self.ledger.settle_hold(s)
            self.settled.setdefault(job, s)
        except FailedPrecondition:
            pass

    @precondition(lambda self: bool(self.jobs))
    @rule(data=stt.data())
    def release(self, data: stt.DataObject) -> None:
        job = data.draw(stt.sampled_from(sorted(self.jobs)))
        try:
            self.ledger.release_hold(job)
        except FailedPrecondition:
            assert job in self.settled

    @invariant()
    def books_balance(self) -> None:
        assert self.ledger.check() == []
        assert self.ledger.minted() == self.minted


TestLedgerMachine = LedgerMachine.TestCase
TestLedgerMachine.settings = settings(max_examples=40, stateful_step_count=25, deadline=None)
