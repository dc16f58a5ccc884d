"""The ledger never creates, loses or double-pays money — on SQLite and on
PostgreSQL alike: one suite, both stores."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as stt
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from aitbc.addresses import address_of
from aitbc.crypto import KeyPair
from aitbc.errors import AitbcError, AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from wallet_svc._ledger import INT64_MAX, SETTLED, Ledger, Settlement, Transfer
from wallet_svc._stores import LedgerStore, open_store


def addr() -> str:
    return address_of(KeyPair.generate().public_key)


class Book:
    """Calls each Ledger method in its own transaction on the store."""

    def __init__(self, store: LedgerStore, treasury: str) -> None:
        self.store = store
        self.ledger = Ledger(treasury)
        self.treasury = treasury

    def __getattr__(self, name: str) -> Callable[..., Any]:
        fn = getattr(self.ledger, name)
        return lambda *args, **kw: self.store.call(lambda tx: fn(tx, *args, **kw))


@pytest.fixture
def book(store_url: str) -> Iterator[Book]:
    store = open_store(store_url)
    try:
        yield Book(store, addr())
    finally:
        store.close()


def settlement(job: str, client: str, miner: str, hold: int, pay: int, fee: int, tag: bytes = b"1") -> Settlement:
    return Settlement(job, client, miner, hold, pay, fee, digest=job.encode() + tag)


def transfer(src: str, dst: str, amount: int, rid: str, tag: bytes = b"1") -> Transfer:
    return Transfer(src, dst, amount, rid, digest=rid.encode() + tag)


def test_hold_settle_moves_exactly_the_price(book: Book) -> None:
    client, miner = addr(), addr()
    book.mint(client, 10_000, "m1")
    book.place_hold("job1", client, 5_000)
    assert book.balance(client).available == 5_000 and book.balance(client).held == 5_000
    hold = book.settle_hold(settlement("job1", client, miner, 5_000, 900, 100))
    assert (hold.state, hold.miner_amount, hold.fee_amount, hold.refunded_amount) == (SETTLED, 900, 100, 4_000)
    assert book.balance(client).available == 9_000 and book.balance(client).held == 0
    assert book.balance(miner).available == 900
    assert book.balance(book.treasury).available == 100
    assert book.check() == []


def test_one_settlement_pays_every_agreeing_miner_once(book: Book) -> None:
    client, first, second, third = addr(), addr(), addr(), addr()
    book.mint(client, 10_000, "m1")
    book.place_hold("job1", client, 5_000)
    s = Settlement("job1", client, first, 5_000, 900, 300, digest=b"d1", co_payouts=((second, 900), (third, 900)))
    for _ in range(2):  # a retry pays nothing more
        hold = book.settle_hold(s)
    assert (hold.miner_amount, hold.fee_amount, hold.refunded_amount) == (2_700, 300, 2_000)
    assert [book.balance(a).available for a in (first, second, third)] == [900, 900, 900]
    assert book.balance(client).available == 7_000
    assert book.check() == []


def test_co_payouts_count_against_the_hold(book: Book) -> None:
    client = addr()
    book.mint(client, 100, "m")
    book.place_hold("j", client, 100)
    for bad, error in (
        (Settlement("j", client, addr(), 100, 50, 0, digest=b"a", co_payouts=((addr(), 51),)), FailedPrecondition),
        (Settlement("j", client, addr(), 100, 10, 0, digest=b"b", co_payouts=((addr(), 0),)), InvalidArgument),
        (Settlement("j", client, addr(), 100, 10, 0, digest=b"c", co_payouts=((addr(), -5),)), InvalidArgument),
    ):
        with pytest.raises(error):
            book.settle_hold(bad)
    assert book.get_hold("j").state == "HELD"
    assert book.check() == []


def test_every_operation_is_idempotent(book: Book) -> None:
    client, miner = addr(), addr()
    assert book.mint(client, 100, "m") == book.mint(client, 100, "m")
    with pytest.raises(AlreadyExists):
        book.mint(client, 101, "m")
    assert book.place_hold("j", client, 60) == book.place_hold("j", client, 60)
    with pytest.raises(AlreadyExists):
        book.place_hold("j", client, 61)
    s = settlement("j", client, miner, 60, 50, 5)
    assert book.settle_hold(s) == book.settle_hold(s)
    with pytest.raises(FailedPrecondition, match="settled differently"):
        book.settle_hold(settlement("j", client, miner, 60, 50, 5, tag=b"2"))
    with pytest.raises(FailedPrecondition):
        book.release_hold("j")
    assert book.balance(miner).available == 50
    assert book.minted() == 100
    assert book.check() == []


def test_transfers_apply_once_per_request_id(book: Book) -> None:
    a, b = addr(), addr()
    book.mint(a, 100, "m")
    first = book.transfer(transfer(a, b, 30, "t1"))
    assert book.transfer(transfer(a, b, 30, "t1"))[0] == first[0]
    with pytest.raises(AlreadyExists):
        book.transfer(transfer(a, b, 31, "t1", tag=b"other body"))
    with pytest.raises(FailedPrecondition):
        book.transfer(transfer(a, b, 71, "t2"))
    with pytest.raises(InvalidArgument):
        book.transfer(transfer(a, a, 1, "t3"))
    assert (book.balance(a).available, book.balance(b).available) == (70, 30)
    assert book.check() == []


def test_history_is_newest_first_with_counterparties(book: Book) -> None:
    client, miner = addr(), addr()
    book.mint(client, 1_000, "m")
    book.place_hold("j", client, 500)
    book.settle_hold(settlement("j", client, miner, 500, 90, 10))
    book.transfer(transfer(client, miner, 7, "t"))
    entries = book.history(client, None, 10)
    assert [e.kind for e in entries] == ["transfer", "settle", "hold", "mint"]
    assert (entries[0].available_delta, entries[0].counterparty) == (-7, miner)
    assert (entries[1].available_delta, entries[1].held_delta, entries[1].job_id) == (400, -500, "j")
    assert entries[1].counterparty == miner
    assert entries[3].counterparty == "@issuance"
    older = book.history(client, entries[1].txn_id, 10)
    assert [e.kind for e in older] == ["hold", "mint"]
    mine = book.history(miner, None, 10)
    assert [(e.kind, e.available_delta, e.counterparty) for e in mine] == [
        ("transfer", 7, client),
        ("settle", 90, client),
    ]


def test_release_then_settle_is_refused(book: Book) -> None:
    client = addr()
    book.mint(client, 100, "m")
    book.place_hold("j", client, 100)
    assert book.release_hold("j") == book.release_hold("j")
    with pytest.raises(FailedPrecondition, match="released"):
        book.settle_hold(settlement("j", client, addr(), 100, 10, 0))
    assert book.balance(client).available == 100


BAD_CALLS: list[tuple[str, Callable[[Book, str], Any], type[AitbcError]]] = [
    ("zero mint", lambda b, c: b.mint(c, 0, "r"), InvalidArgument),
    ("negative mint", lambda b, c: b.mint(c, -5, "r"), InvalidArgument),
    ("mint over int64", lambda b, c: b.mint(c, INT64_MAX + 1, "r"), InvalidArgument),
    ("mint without id", lambda b, c: b.mint(c, 5, ""), InvalidArgument),
    ("supply overflow", lambda b, c: b.mint(c, INT64_MAX - 50, "r"), FailedPrecondition),
    ("hold above funds", lambda b, c: b.place_hold("j", c, 101), FailedPrecondition),
    ("negative hold", lambda b, c: b.place_hold("j", c, -1), InvalidArgument),
    ("hold without job", lambda b, c: b.place_hold("", c, 1), InvalidArgument),
    ("release unknown", lambda b, c: b.release_hold("nope"), NotFound),
    ("transfer above funds", lambda b, c: b.transfer(transfer(c, addr(), 101, "t")), FailedPrecondition),
    ("zero transfer", lambda b, c: b.transfer(transfer(c, addr(), 0, "t")), InvalidArgument),
    ("negative transfer", lambda b, c: b.transfer(transfer(c, addr(), -1, "t")), InvalidArgument),
]


@pytest.mark.parametrize(("name", "call", "error"), BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_amounts_change_nothing(book: Book, name: str, call: Callable[[Book, str], Any], error: type) -> None:
    client = addr()
    book.mint(client, 100, "seed")
    with pytest.raises(error):
        call(book, client)
    assert book.balance(client).available == 100
    assert book.minted() == 100
    assert book.check() == []


def test_settlement_cannot_exceed_or_mismatch_the_hold(book: Book) -> None:
    client, other = addr(), addr()
    book.mint(client, 100, "m")
    book.place_hold("j", client, 100)
    for bad in (
        settlement("j", client, addr(), 100, 90, 11),
        settlement("j", other, addr(), 100, 1, 0),
        settlement("j", client, addr(), 99, 1, 0),
        settlement("nope", client, addr(), 100, 1, 0),
    ):
        with pytest.raises((FailedPrecondition, NotFound)):
            book.settle_hold(bad)
    assert book.get_hold("j").state == "HELD"
    assert book.check() == []


def test_check_finds_a_tampered_balance(book: Book) -> None:
    client = addr()
    book.mint(client, 100, "m")
    book.store.call(lambda tx: tx.run("UPDATE balances SET available = 1000 WHERE address = ?", (client,)))
    problems = book.check()
    assert any("journal says [100, 0]" in p for p in problems)
    assert any("minted" in p for p in problems)


class LedgerMachine(RuleBasedStateMachine):
    """Random mint / transfer / hold / settle / release and retries; the
    books must balance after every step."""

    store_factory: Callable[[], LedgerStore]

    def __init__(self) -> None:
        super().__init__()
        self.book = Book(self.store_factory(), addr())
        self.accounts = [addr() for _ in range(3)]
        self.minted = 0
        self.jobs: dict[str, tuple[str, int]] = {}
        self.settled: dict[str, Settlement] = {}
        self.n = 0

    def teardown(self) -> None:
        self.book.store.close()

    def _id(self) -> str:
        self.n += 1
        return f"r{self.n}"

    @rule(who=stt.integers(0, 2), amount=stt.integers(1, 10_000), retry=stt.booleans())
    def mint(self, who: int, amount: int, retry: bool) -> None:
        rid = self._id()
        self.book.mint(self.accounts[who], amount, rid)
        if retry:
            self.book.mint(self.accounts[who], amount, rid)
        self.minted += amount

    @rule(src=stt.integers(0, 2), dst=stt.integers(0, 2), amount=stt.integers(1, 5_000), retry=stt.booleans())
    def transfer(self, src: int, dst: int, amount: int, retry: bool) -> None:
        t = transfer(self.accounts[src], self.accounts[dst], amount, self._id())
        try:
            first = self.book.transfer(t)
        except (FailedPrecondition, InvalidArgument):
            return
        if retry:
            assert self.book.transfer(t)[0] == first[0]

    @rule(who=stt.integers(0, 2), amount=stt.integers(1, 5_000))
    def hold(self, who: int, amount: int) -> None:
        job = "j" + self._id()
        try:
            self.book.place_hold(job, self.accounts[who], amount)
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
            self.book.settle_hold(s)
            if retry:
                self.book.settle_hold(s)
            self.settled.setdefault(job, s)
        except FailedPrecondition:
            pass

    @precondition(lambda self: bool(self.jobs))
    @rule(data=stt.data())
    def release(self, data: stt.DataObject) -> None:
        job = data.draw(stt.sampled_from(sorted(self.jobs)))
        try:
            self.book.release_hold(job)
        except FailedPrecondition:
            assert job in self.settled

    @invariant()
    def books_balance(self) -> None:
        assert self.book.check() == []
        assert self.book.minted() == self.minted
        for job, s in self.settled.items():
            hold = self.book.get_hold(job)
            assert hold.state == SETTLED and hold.settlement_sha256 == s.digest


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_stateful_ledger(kind: str, request: pytest.FixtureRequest, tmp_path: Any) -> None:
    counter = iter(range(10**6))
    if kind == "sqlite":

        def factory() -> LedgerStore:
            return open_store(str(tmp_path / f"m{next(counter)}.sqlite"))

    else:
        server = request.getfixturevalue("pg_server")

        def factory() -> LedgerStore:
            return open_store(server.new_database())

    machine = type("Machine", (LedgerMachine,), {"store_factory": staticmethod(factory)})
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=25, stateful_step_count=20, deadline=None, suppress_health_check=list(HealthCheck)
        ),
    )


def test_a_postgres_database_of_another_schema_version_is_refused(pg_server: Any) -> None:
    import psycopg

    from aitbc.sqlite import SchemaMismatch

    url = pg_server.new_database()
    open_store(url).close()
    open_store(url).close()  # the same version opens again
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE aitbc_schema SET version = 99 WHERE name = 'wallet'")
    with pytest.raises(SchemaMismatch, match="version 99"):
        open_store(url)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DELETE FROM aitbc_schema")  # tables from before versions
    with pytest.raises(SchemaMismatch, match="before schema versions"):
        open_store(url)
