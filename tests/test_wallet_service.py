"""The wallet as a process, over gRPC: roles, signed transfers, history,
and attempts to make it pay twice — concurrent callers, several processes,
SIGKILL at random moments."""

from __future__ import annotations

import asyncio
import random
import secrets
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from aitbc import crypto
from aitbc.rpc import error_reason
from aitbc.signed import seal
from aitbc.v1 import signing_pb2, wallet_pb2, wallet_pb2_grpc
from tests.conftest import ROOT, Network, md

pytestmark = pytest.mark.timeout(300)
NETWORK_ID = "aitbc-devnet"


class Wallet:
    def __init__(self, net: Network, name: str = "wallet") -> None:
        self.net = net
        self.channel = grpc.aio.insecure_channel(net.target(name))
        self.stub = wallet_pb2_grpc.WalletServiceStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    def as_(self, who: str) -> Any:
        return md(self.net.ids[who])

    async def mint(self, address: str, amount: int) -> None:
        await self.stub.Mint(
            wallet_pb2.MintRequest(address=address, amount=amount, request_id=secrets.token_hex(8)),
            metadata=self.as_("admin"),
            timeout=10,
        )

    async def balance(self, address: str) -> tuple[int, int]:
        b = await self.stub.GetBalance(wallet_pb2.GetBalanceRequest(address=address), metadata=self.as_("admin"))
        return b.available, b.held

    async def hold(self, job: str, address: str, amount: int) -> None:
        await self.stub.PlaceHold(
            wallet_pb2.PlaceHoldRequest(job_id=job, address=address, amount=amount),
            metadata=self.as_("coordinator"),
            timeout=10,
        )

    def settlement(self, job: str, client: str, miner: str, hold: int, pay: int, fee: int) -> signing_pb2.Signed:
        body = signing_pb2.SettlementBody(
            network_id=NETWORK_ID,
            job_id=job,
            client_address=client,
            miner_address=miner,
            hold_amount=hold,
            miner_amount=pay,
            fee_amount=fee,
            receipt_sha256=secrets.token_bytes(32),
        )
        return seal(body, crypto.SETTLEMENT_DOMAIN, self.net.coordinator_key)

    async def settle(self, signed: signing_pb2.Signed, timeout: float = 10) -> wallet_pb2.Hold:
        resp = await self.stub.SettleHold(
            wallet_pb2.SettleHoldRequest(settlement=signed), metadata=self.as_("coordinator"), timeout=timeout
        )
        return resp.hold


@pytest.fixture
async def wallet(network: Network) -> AsyncIterator[Wallet]:
    network.start_wallet()
    w = Wallet(network)
    try:
        yield w
    finally:
        await w.close()


def signed_transfer(key: crypto.KeyPair, src: str, dst: str, amount: int, rid: str, network: str = NETWORK_ID) -> Any:
    body = signing_pb2.TransferBody(network_id=network, from_address=src, to_address=dst, amount=amount, request_id=rid)
    return wallet_pb2.TransferRequest(transfer=seal(body, crypto.TRANSFER_DOMAIN, key))


async def test_transfers_are_authorised_by_the_senders_signature(wallet: Wallet, network: Network) -> None:
    alice, bob = network.ids["client"], network.ids["client2"]
    assert alice.key is not None and bob.key is not None
    await wallet.mint(alice.address, 1_000)
    req = signed_transfer(alice.key, alice.address, bob.address, 300, "pay-bob")
    first = await wallet.stub.Transfer(req, metadata=wallet.as_("client"))
    again = await wallet.stub.Transfer(req, metadata=wallet.as_("client"))
    assert first.transaction_id == again.transaction_id
    assert first.sender_balance.available == 700
    assert await wallet.balance(bob.address) == (300, 0)

    refusals = [
        # Same request id, other body.
        (signed_transfer(alice.key, alice.address, bob.address, 301, "pay-bob"), "ALREADY_EXISTS"),
        # Bob signs a transfer out of Alice's account.
        (signed_transfer(bob.key, alice.address, bob.address, 1, "steal"), "PERMISSION_DENIED"),
        (signed_transfer(alice.key, alice.address, bob.address, 10_000, "too-much"), "FAILED_PRECONDITION"),
        (signed_transfer(alice.key, alice.address, bob.address, 0, "zero"), "INVALID_ARGUMENT"),
        (signed_transfer(alice.key, alice.address, bob.address, 1, "net", network="other-net"), "FAILED_PRECONDITION"),
        (signed_transfer(alice.key, alice.address, bob.address[:-1] + "x", 1, "typo"), "INVALID_ARGUMENT"),
    ]
    for request, code in refusals:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await wallet.stub.Transfer(request, metadata=wallet.as_("client"))
        assert err.value.code().name == code, err.value.details()
        assert error_reason(err.value)
    tampered = signed_transfer(alice.key, alice.address, bob.address, 5, "tamper")
    tampered.transfer.body = tampered.transfer.body.replace(b"\x05", b"\x50")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await wallet.stub.Transfer(tampered, metadata=wallet.as_("client"))
    assert error_reason(err.value) == "BAD_SIGNATURE"
    assert await wallet.balance(alice.address) == (700, 0)


async def test_history_is_private_paginated_and_newest_first(wallet: Wallet, network: Network) -> None:
    alice, bob = network.ids["client"], network.ids["client2"]
    assert alice.key is not None
    await wallet.mint(alice.address, 1_000)
    for i in range(7):
        await wallet.stub.Transfer(
            signed_transfer(alice.key, alice.address, bob.address, i + 1, f"t{i}"), metadata=wallet.as_("client")
        )
    seen: list[wallet_pb2.Transaction] = []
    token = ""
    while True:
        page = await wallet.stub.ListTransactions(
            wallet_pb2.ListTransactionsRequest(address=alice.address, page_size=3, page_token=token),
            metadata=wallet.as_("client"),
        )
        assert len(page.transactions) <= 3
        seen += page.transactions
        token = page.next_page_token
        if not token:
            break
    assert [t.available_delta for t in seen] == [-7, -6, -5, -4, -3, -2, -1, 1_000]
    assert all(t.counterparty == bob.address for t in seen[:7])
    ids = [t.transaction_id for t in seen]
    assert ids == sorted(ids, reverse=True)
    # Bob may not read Alice's history; the admin may.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await wallet.stub.ListTransactions(
            wallet_pb2.ListTransactionsRequest(address=alice.address), metadata=wallet.as_("client2")
        )
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    admin_view = await wallet.stub.ListTransactions(
        wallet_pb2.ListTransactionsRequest(address=alice.address), metadata=wallet.as_("admin")
    )
    assert len(admin_view.transactions) == 8
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await wallet.stub.ListTransactions(
            wallet_pb2.ListTransactionsRequest(address=alice.address, page_token="garbage"),
            metadata=wallet.as_("client"),
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_accounts_are_registered_for_valid_keys_only(wallet: Wallet, network: Network) -> None:
    key = crypto.KeyPair.generate()
    resp = await wallet.stub.CreateAccount(
        wallet_pb2.CreateAccountRequest(public_key=key.public_key), metadata=wallet.as_("client")
    )
    from aitbc.addresses import address_of

    assert resp.address == address_of(key.public_key)
    again = await wallet.stub.CreateAccount(
        wallet_pb2.CreateAccountRequest(public_key=key.public_key), metadata=wallet.as_("client")
    )
    assert again.address == resp.address
    for bad in (bytes(32), b"\x01" + bytes(31), bytes(31)):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await wallet.stub.CreateAccount(
                wallet_pb2.CreateAccountRequest(public_key=bad), metadata=wallet.as_("client")
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_reason(err.value) == "BAD_PUBLIC_KEY"


async def test_only_the_coordinator_moves_escrow(wallet: Wallet, network: Network) -> None:
    client = network.ids["client"].address
    await wallet.mint(client, 100)
    for who in ("client", "miner", "admin"):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await wallet.stub.PlaceHold(
                wallet_pb2.PlaceHoldRequest(job_id="j", address=client, amount=10), metadata=wallet.as_(who)
            )
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    await wallet.hold("j", client, 100)
    # A settlement signed by any key but the coordinator's pays nothing.
    forged = seal(
        signing_pb2.SettlementBody(
            network_id=NETWORK_ID, job_id="j", client_address=client, miner_address=network.ids["miner"].address,
            hold_amount=100, miner_amount=100,
        ),
        crypto.SETTLEMENT_DOMAIN,
        crypto.KeyPair.generate(),
    )  # fmt: skip
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await wallet.settle(forged)
    assert error_reason(err.value) == "BAD_SIGNATURE"
    assert await wallet.balance(network.ids["miner"].address) == (0, 0)


async def test_batched_settlements_succeed_or_fail_each_on_their_own(wallet: Wallet, network: Network) -> None:
    client, miner = network.ids["client"].address, network.ids["miner"].address
    await wallet.mint(client, 10_000)
    for i in range(5):
        await wallet.hold(f"b{i}", client, 1_000)
    good = [wallet.settlement(f"b{i}", client, miner, 1_000, 100, 10) for i in range(4)]
    over = wallet.settlement("b4", client, miner, 1_000, 2_000, 0)
    unknown = wallet.settlement("nope", client, miner, 1_000, 1, 0)
    resp = await wallet.stub.SettleHolds(
        wallet_pb2.SettleHoldsRequest(settlements=[*good, over, unknown, good[0]]),
        metadata=wallet.as_("coordinator"),
    )
    reasons = [r.error.reason for r in resp.results]
    assert reasons == ["", "", "", "", "SETTLEMENT_EXCEEDS_HOLD", "HOLD_NOT_FOUND", ""]
    assert all(r.hold.state == wallet_pb2.HOLD_STATE_SETTLED for r in resp.results[:4])
    assert await wallet.balance(miner) == (400, 0)
    assert await wallet.balance(client) == (10_000 - 4 * 110 - 1_000, 1_000)


async def _concurrent_settles(wallets: list[Wallet], network: Network) -> None:
    client, miner = network.ids["client"].address, network.ids["miner"].address
    await wallets[0].mint(client, 5_000)
    await wallets[0].hold("race", client, 5_000)
    signed = wallets[0].settlement("race", client, miner, 5_000, 1_000, 100)
    holds = await asyncio.gather(*(wallets[i % len(wallets)].settle(signed) for i in range(50)))
    assert len({h.SerializeToString(deterministic=True) for h in holds}) == 1
    assert holds[0].state == wallet_pb2.HOLD_STATE_SETTLED
    assert await wallets[0].balance(miner) == (1_000, 0)
    assert await wallets[0].balance(client) == (3_900, 0)
    # Different settlements racing for one job: exactly one pays.
    await wallets[0].hold("race2", client, 3_900)
    rivals = [wallets[0].settlement("race2", client, miner, 3_900, 10 + i, 0) for i in range(20)]
    results = await asyncio.gather(
        *(wallets[i % len(wallets)].settle(s) for i, s in enumerate(rivals)), return_exceptions=True
    )
    winners = [r for r in results if isinstance(r, wallet_pb2.Hold)]
    assert len(winners) == 1, results
    losers = [r for r in results if r not in winners]
    assert all(isinstance(r, grpc.aio.AioRpcError) and error_reason(r) == "ALREADY_SETTLED" for r in losers)
    assert await wallets[0].balance(miner) == (1_000 + winners[0].miner_amount, 0)


async def test_fifty_concurrent_settlements_pay_once_sqlite(wallet: Wallet, network: Network) -> None:
    await _concurrent_settles([wallet], network)
    assert wallet_check(network, str(network.root / "wallet.sqlite")).returncode == 0


async def test_fifty_concurrent_settlements_pay_once_on_two_postgres_processes(
    network: Network, pg_server: Any
) -> None:
    dsn = pg_server.new_database()
    network.start_wallet(db=dsn, name="wallet")
    network.start_wallet(db=dsn, name="wallet2")
    wallets = [Wallet(network, "wallet"), Wallet(network, "wallet2")]
    try:
        await _concurrent_settles(wallets, network)
    finally:
        for w in wallets:
            await w.close()
    assert wallet_check(network, dsn).returncode == 0


def wallet_check(network: Network, db: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "wallet_svc", "check", "--db", db, "--treasury-address", network.treasury],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_check_exits_non_zero_on_a_tampered_ledger(wallet: Wallet, network: Network) -> None:
    client = network.ids["client"].address
    await wallet.mint(client, 100)
    network.stop("wallet")
    db = network.root / "wallet.sqlite"
    assert wallet_check(network, str(db)).returncode == 0
    import sqlite3

    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE balances SET available = available + 1 WHERE address = ?", (client,))
    out = wallet_check(network, str(db))
    assert out.returncode == 1 and "MISMATCH" in out.stdout


async def settle_all(w: Wallet, settlements: dict[str, signing_pb2.Signed], acknowledged: dict[str, int]) -> None:
    """16 callers; record what the wallet acknowledged before it died."""
    sem = asyncio.Semaphore(16)

    async def one(job: str, signed: signing_pb2.Signed) -> None:
        async with sem:
            try:
                hold = await w.settle(signed, timeout=5)
            except grpc.aio.AioRpcError:
                return
            acknowledged[job] = hold.miner_amount

    await asyncio.gather(*(one(j, s) for j, s in settlements.items()))


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
async def test_sigkill_during_settlements_loses_nothing_and_pays_nothing_twice(
    network: Network, kind: str, request: pytest.FixtureRequest
) -> None:
    """Ten times: stream settlements, SIGKILL the wallet at a random moment,
    restart it. Every acknowledged settlement survives; retrying all of them
    pays none twice; `check` stays clean."""
    rng = random.Random(1234)
    client, miner = network.ids["client"].address, network.ids["miner"].address
    db = str(network.root / "wallet.sqlite")
    if kind == "postgres":
        db = request.getfixturevalue("pg_server").new_database()
    network.start_wallet(db=db)
    w = Wallet(network)
    await w.mint(client, 10**12)
    await w.close()
    acknowledged: dict[str, int] = {}
    all_settlements: dict[str, signing_pb2.Signed] = {}
    for round_no in range(10):
        w = Wallet(network)
        jobs = [f"k{round_no}-{i}" for i in range(400)]
        await asyncio.gather(*(w.hold(job, client, 1_000) for job in jobs))
        settlements = {job: w.settlement(job, client, miner, 1_000, rng.randint(1, 900), 50) for job in jobs}
        all_settlements.update(settlements)

        runner = asyncio.create_task(settle_all(w, settlements, acknowledged))
        await asyncio.sleep(rng.uniform(0.02, 0.4))
        network.procs["wallet"].send_signal(signal.SIGKILL)
        await runner
        await w.close()
        network.stop("wallet")
        network.start_wallet(db=db)
    w = Wallet(network)
    try:
        assert acknowledged, "the kill came before any settlement; nothing was tested"
        # And at least one kill landed mid-stream, with settlements unanswered.
        assert len(acknowledged) < len(all_settlements), "no kill interrupted anything"
        for job, amount in acknowledged.items():
            hold = (
                await w.stub.SettleHold(
                    wallet_pb2.SettleHoldRequest(settlement=all_settlements[job]), metadata=w.as_("coordinator")
                )
            ).hold
            assert hold.state == wallet_pb2.HOLD_STATE_SETTLED and hold.miner_amount == amount
        # Retry everything, acknowledged or not: each job pays exactly once.
        resp = await w.stub.SettleHolds(
            wallet_pb2.SettleHoldsRequest(settlements=list(all_settlements.values())[:1000]),
            metadata=w.as_("coordinator"),
        )
        assert all(not r.error.code for r in resp.results)
        for chunk in range(1000, len(all_settlements), 1000):
            await w.stub.SettleHolds(
                wallet_pb2.SettleHoldsRequest(settlements=list(all_settlements.values())[chunk : chunk + 1000]),
                metadata=w.as_("coordinator"),
            )
        expected = sum(signing_pb2.SettlementBody.FromString(s.body).miner_amount for s in all_settlements.values())
        assert await w.balance(miner) == (expected, 0)
    finally:
        await w.close()
    network.stop("wallet")
    out = wallet_check(network, db)
    assert out.returncode == 0, out.stdout
