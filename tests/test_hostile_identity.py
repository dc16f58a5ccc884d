"""Hostile parties against miner identity, token revocation and leases,
each tried from the proto as an attacker would: a miner token that names no
miner id, one miner claiming another's id, a revoked or expired token on an
open stream (and its racing result), a miner that heartbeats but never
finishes, and refusals at the gate that must never read INTERNAL."""

from __future__ import annotations

import asyncio
import collections
import json
import secrets
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from aitbc import crypto
from aitbc.auth import Principal, TokenTable, new_token
from aitbc.crypto import KeyPair
from aitbc.rpc import error_reason
from aitbc.signed import seal
from aitbc.timeutil import ts_now
from aitbc.v1 import coordinator_pb2 as cpb
from aitbc.v1 import coordinator_pb2_grpc, signing_pb2, workloads_pb2
from tests.conftest import ROOT, Identity, Network, eventually, md
from tests.test_e2e import Clients, matmul_spec
from tests.test_rekey import Stream, get_job

pytestmark = pytest.mark.timeout(240)


async def refused_connect(channel: grpc.aio.Channel, token: str | None) -> tuple[str, str]:
    """A Connect that says hello and waits, as a sidecar does."""
    metadata = (("authorization", f"Bearer {token}"),) if token else ()

    async def requests() -> AsyncIterator[cpb.ConnectRequest]:
        yield cpb.ConnectRequest(hello=cpb.MinerHello(miner_id="anyone"))
        await asyncio.sleep(30)

    call = coordinator_pb2_grpc.MinerGatewayServiceStub(channel).Connect(requests(), metadata=metadata, timeout=20)
    try:
        async for _ in call:
            pass
    except grpc.aio.AioRpcError as err:
        return err.code().name, error_reason(err)
    return "OK", ""


async def test_connect_refused_at_the_gate_is_never_internal(network: Network) -> None:
    """The refusal races the caller's hello: grpc's client reported INTERNAL
    for a few percent of such calls until the gate waited for the hello."""
    network.start_wallet()
    network.start_coordinator()
    seen: collections.Counter[tuple[str, str]] = collections.Counter()
    async with grpc.aio.insecure_channel(network.coord_target) as channel:
        for token in (None, network.ids["client"].token):
            for _ in range(4):
                seen.update(await asyncio.gather(*(refused_connect(channel, token) for _ in range(50))))
    assert seen == {
        ("UNAUTHENTICATED", "MISSING_TOKEN"): 200,
        ("PERMISSION_DENIED", "ROLE_NOT_ALLOWED"): 200,
    }, seen


def key_of(net: Network, who: str) -> KeyPair:
    key = net.ids[who].key
    assert key is not None
    return key


def write_tokens(net: Network) -> None:
    """The principals file the services follow, from net.ids."""
    TokenTable.dump(net.root / "principals.json", [(i.token, i.principal) for i in net.ids.values()])


def books_are_clean(net: Network) -> None:
    """Every service stopped, the wallet's journal recomputed: balanced."""
    net.stop_all()
    check = subprocess.run(
        [sys.executable, "-m", "wallet_svc", "check", "--db", str(net.root / "wallet.sqlite"),
         "--treasury-address", net.treasury],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert check.returncode == 0 and "clean" in check.stdout, check.stdout + check.stderr


async def rotate_key(net: Network, who: str, miner_id: str) -> tuple[str, str]:
    """RotateKey for `miner_id`, signed by `who`'s key: its refusal."""
    old, new = key_of(net, who), KeyPair.generate()
    body = signing_pb2.KeyRotationBody(
        network_id="aitbc-devnet", miner_id=miner_id, new_public_key=new.public_key, create_time=ts_now(),
        nonce=secrets.token_bytes(16),
    )  # fmt: skip
    signed = seal(body, crypto.KEY_ROTATION_DOMAIN, old)
    request = cpb.RotateKeyRequest(rotation=signed, new_key_signature=new.sign(crypto.KEY_ROTATION_DOMAIN, signed.body))
    async with grpc.aio.insecure_channel(net.coord_target) as ch:
        try:
            await coordinator_pb2_grpc.MinerGatewayServiceStub(ch).RotateKey(request, metadata=md(net.ids[who]),
                                                                             timeout=10)  # fmt: skip
        except grpc.aio.AioRpcError as err:
            return err.code().name, error_reason(err)
    return "OK", ""


async def hello_as(net: Network, who: str, miner_id: str) -> tuple[grpc.StatusCode, str]:
    """`who`'s token and key, saying hello as `miner_id`: how it ends."""
    stream = Stream(net, who, key_of(net, who), net.coord_target)
    stream.hello.miner_id = miner_id
    async with stream as s:
        return await s.status()


async def run_honestly(net: Network, clients: Clients, who: str) -> cpb.Job:
    """`who` connects with its own key and runs one job to the end."""
    async with Stream(net, who, key_of(net, who), net.coord_target) as s:
        await s.next("welcome")
        job = await clients.submit(matmul_spec(n=16))
        a = await s.next("assignment")
        s.accept(a)
        s.deliver(a)
        assert (await s.next("ack")).verdict == cpb.VERDICT_ACCEPTED
        return (await clients.watch(job.job_id))[-1]


async def test_a_miner_token_that_names_no_miner_id_is_refused_and_squats_nothing(network: Network) -> None:
    network.start_wallet()
    network.start_coordinator()
    clients = Clients(network)
    try:
        await clients.mint("client", 10**8)
        before = await clients.balance(network.ids["client"].address)
        # Written by hand or by an older tokens CLI: a miner token with no id.
        network.add_identity("nameless", "miner")

        async def refused() -> None:
            got = await hello_as(network, "nameless", "miner-2")
            assert got == (grpc.StatusCode.PERMISSION_DENIED, "NO_MINER_ID"), got

        await eventually(refused, timeout=10)  # once the coordinator has reloaded the file
        assert await hello_as(network, "nameless", "") == (grpc.StatusCode.PERMISSION_DENIED, "NO_MINER_ID")
        assert await rotate_key(network, "nameless", "miner-2") == ("PERMISSION_DENIED", "NO_MINER_ID")

        # miner-2's owner was not locked out: its own key registers and earns.
        final = await run_honestly(network, clients, "miner2")
        assert final.state == cpb.JOB_STATE_SETTLED and final.miner_id == "miner-2"
        assert final.receipt.public_key == key_of(network, "miner2").public_key
        assert await clients.balance(network.ids["miner2"].address) == (final.miner_amount, 0)
        assert await clients.balance(network.ids["nameless"].address) == (0, 0)
        assert await clients.balance(network.ids["client"].address) == (before[0] - final.price, 0)
    finally:
        await clients.close()
    books_are_clean(network)


async def test_a_miner_token_cannot_claim_another_miners_id(network: Network) -> None:
    network.start_wallet()
    network.start_coordinator()
    clients = Clients(network)
    try:
        await clients.mint("client", 10**8)
        before = await clients.balance(network.ids["client"].address)
        # cheater-1's token, hello as miner-2: with its own key, and with
        # miner-2's public key (it cannot sign with it, but may try).
        assert await hello_as(network, "cheater", "miner-2") == (
            grpc.StatusCode.PERMISSION_DENIED,
            "MINER_ID_MISMATCH",
        )
        squat = Stream(network, "cheater", key_of(network, "miner2"), network.coord_target)
        squat.hello.miner_id = "miner-2"
        async with squat as s:
            assert await s.status() == (grpc.StatusCode.PERMISSION_DENIED, "MINER_ID_MISMATCH")
        assert await rotate_key(network, "cheater", "miner-2") == ("PERMISSION_DENIED", "MINER_ID_MISMATCH")

        final = await run_honestly(network, clients, "miner2")
        assert final.state == cpb.JOB_STATE_SETTLED and final.miner_id == "miner-2"
        assert await clients.balance(network.ids["miner2"].address) == (final.miner_amount, 0)
        assert await clients.balance(network.ids["cheater"].address) == (0, 0)
        assert await clients.balance(network.ids["client"].address) == (before[0] - final.price, 0)

        # The tokens CLI will not issue a second name a token for miner-2 ...
        file = str(network.root / "principals.json")
        out = subprocess.run(
            [sys.executable, "-m", "aitbc.tokens", "issue", "--file", file, "--name", "thief", "--role", "miner",
             "--miner-id", "miner-2"],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert out.returncode == 2 and "belongs to 'miner2'" in out.stderr, out.stderr
        assert "thief" not in (network.root / "principals.json").read_text()
        # ... and a file edited by hand to do it is not taken: the services
        # keep the table they had, so the thief's token is unknown.
        thief = network.add_identity("thief", "miner", miner_id="miner-2")
        await asyncio.sleep(1.5)  # past a reload; nothing to wait for: nothing changes
        assert await hello_as(network, "thief", "miner-2") == (grpc.StatusCode.UNAUTHENTICATED, "BAD_TOKEN")
        lines = [json.loads(x) for x in network.log("coordinator").read_text().splitlines() if x.startswith("{")]
        assert any(x["event"] == "tokens_file_unreadable" and "claimed by" in x["error"] for x in lines)
        assert thief.token not in network.log("coordinator").read_text()
    finally:
        await clients.close()
    books_are_clean(network)


def revoke(net: Network, who: str) -> None:
    """What `python -m aitbc.tokens revoke` does: the name's token is gone."""
    del net.ids[who]
    write_tokens(net)


def expiring_miner(net: Network, name: str, miner_id: str, seconds: float) -> Identity:
    key = KeyPair.generate()
    from aitbc.addresses import address_of

    principal = Principal(name, "miner", address=address_of(key.public_key), miner_id=miner_id,
                          expires=time.time() + seconds)  # fmt: skip
    ident = net.ids[name] = Identity(new_token(), principal, key)
    write_tokens(net)
    return ident


async def requeued_then_paid_elsewhere(
    net: Network, clients: Clients, job_id: str, lost: str, lost_address: str, before: tuple[int, int],
    target: str = "",
) -> None:  # fmt: skip
    """The job taken from `lost` settles once, on miner-2 (connected to
    `target`), and only miner-2 is paid; the client pays its price once."""

    async def requeued() -> None:
        j = await get_job(clients, job_id)
        assert j.state == cpb.JOB_STATE_QUEUED, j

    await eventually(requeued, timeout=15)
    async with Stream(net, "miner2", key_of(net, "miner2"), target or net.coord_target) as honest:
        await honest.next("welcome")
        a = await honest.next("assignment")
        assert a.job_id == job_id
        honest.accept(a)
        honest.deliver(a)
        assert (await honest.next("ack")).verdict == cpb.VERDICT_ACCEPTED
        final = (await clients.watch(job_id))[-1]
    assert final.state == cpb.JOB_STATE_SETTLED and (final.miner_id, final.attempts) == ("miner-2", 2), final
    assert [r.miner_id for r in final.runs] == ["miner-2"]
    assert await clients.balance(net.ids["miner2"].address) == (final.miner_amount, 0)
    assert await clients.balance(lost_address) == (0, 0), f"{lost} was paid"
    assert await clients.balance(net.ids["client"].address) == (before[0] - final.price, 0)


async def test_a_revoked_tokens_open_stream_is_closed_and_its_job_paid_elsewhere(network: Network) -> None:
    network.start_wallet()
    network.start_coordinator()
    clients = Clients(network)
    address = network.ids["miner3"].address
    try:
        await clients.mint("client", 10**8)
        before = await clients.balance(network.ids["client"].address)
        async with Stream(network, "miner3", key_of(network, "miner3"), network.coord_target) as revoked:
            await revoked.next("welcome")
            job = await clients.submit(matmul_spec(n=16))
            a = await revoked.next("assignment")
            revoked.accept(a)
            revoke(network, "miner3")
            # Closed within a few seconds, told to drop the lease first.
            cancel = await revoked.next("cancel", timeout=10)
            assert cancel.lease_id == a.lease_id and "revoked" in cancel.reason
            assert await revoked.status(timeout=5) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_REVOKED")
        await requeued_then_paid_elsewhere(network, clients, job.job_id, "miner3", address, before)
        # Its token opens nothing now, on a new stream either.
        network.ids["miner3"] = Identity(revoked.ident.token, revoked.ident.principal, revoked.ident.key)
        assert await hello_as(network, "miner3", "miner-3") == (grpc.StatusCode.UNAUTHENTICATED, "BAD_TOKEN")
    finally:
        await clients.close()
    lines = [json.loads(x) for x in network.log("coordinator").read_text().splitlines() if x.startswith("{")]
    closed = [x for x in lines if x.get("event") == "miner_stream_closed_token"]
    assert [(x["miner_id"], x["reason"]) for x in closed] == [("miner-3", "TOKEN_REVOKED")]
    books_are_clean(network)


async def test_a_result_racing_its_tokens_revocation_is_not_paid(network: Network) -> None:
    network.start_wallet()
    network.start_coordinator()
    clients = Clients(network)
    address = network.ids["miner3"].address
    try:
        await clients.mint("client", 10**8)
        before = await clients.balance(network.ids["client"].address)
        async with Stream(network, "miner3", key_of(network, "miner3"), network.coord_target) as revoked:
            await revoked.next("welcome")
            job = await clients.submit(matmul_spec(n=16))
            a = await revoked.next("assignment")
            revoked.accept(a)
            # The right output, sent the moment the token is revoked: before
            # the coordinator's next look at the tokens file, most times.
            revoke(network, "miner3")
            revoked.deliver(a)
            ack = await revoked.next("ack", timeout=10)
            assert ack.verdict != cpb.VERDICT_ACCEPTED and ack.miner_amount == 0, ack
            assert await revoked.status(timeout=10) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_REVOKED")
        await requeued_then_paid_elsewhere(network, clients, job.job_id, "miner3", address, before)
    finally:
        await clients.close()
    books_are_clean(network)


async def test_a_run_held_for_agreement_is_withdrawn_when_its_token_is_revoked(network: Network) -> None:
    """A redundant job's first run is held until a second agrees: revoking
    that miner's token meanwhile means its run is never paid, and the job
    needs another agreeing run instead."""
    network.start_wallet()
    network.start_coordinator()
    clients = Clients(network)
    address = network.ids["miner3"].address
    try:
        await clients.mint("client", 10**8)
        before = await clients.balance(network.ids["client"].address)
        spec = matmul_spec(n=16, max_price=10**6)
        spec.verification.redundant.k = 2
        job = await clients.submit(spec)
        async with Stream(network, "miner3", key_of(network, "miner3"), network.coord_target) as revoked:
            await revoked.next("welcome")
            a = await revoked.next("assignment")
            revoked.accept(a)
            revoked.deliver(a)
            assert (await revoked.next("ack")).verdict == cpb.VERDICT_PENDING
            revoke(network, "miner3")
            assert await revoked.status(timeout=10) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_REVOKED")
        for who in ("miner2", "miner"):
            async with Stream(network, who, key_of(network, who), network.coord_target) as honest:
                await honest.next("welcome")
                a = await honest.next("assignment")
                assert a.job_id == job.job_id
                honest.accept(a)
                honest.deliver(a)
                verdict = (await honest.next("ack")).verdict
                assert verdict == (cpb.VERDICT_PENDING if who == "miner2" else cpb.VERDICT_ACCEPTED), (who, verdict)
        final = (await clients.watch(job.job_id))[-1]
        assert final.state == cpb.JOB_STATE_SETTLED, final
        runs = {r.miner_id: r.verdict for r in final.runs}
        assert runs == {"miner-3": cpb.VERDICT_WITHDRAWN, "miner-2": cpb.VERDICT_ACCEPTED,
                        "miner-1": cpb.VERDICT_ACCEPTED}, runs  # fmt: skip
        assert await clients.balance(address) == (0, 0), "the revoked miner was paid"
        for who in ("miner2", "miner"):
            assert await clients.balance(network.ids[who].address) == (final.miner_amount // 2, 0)
        assert await clients.balance(network.ids["client"].address) == (before[0] - final.price, 0)
    finally:
        await clients.close()
    books_are_clean(network)


async def test_an_expired_tokens_open_stream_is_closed_and_its_job_paid_elsewhere(network: Network) -> None:
    network.start_wallet()
    network.start_coordinator()
    clients = Clients(network)
    ident = expiring_miner(network, "shortlived", "miner-9", seconds=10)
    try:
        await clients.mint("client", 10**8)
        before = await clients.balance(network.ids["client"].address)

        async def welcomed() -> Stream:
            s = Stream(network, "shortlived", key_of(network, "shortlived"), network.coord_target)
            await s.__aenter__()
            try:
                await s.next("welcome", timeout=2)
            except TimeoutError:
                await s.__aexit__()
                raise AssertionError("not welcomed yet") from None
            return s

        expiring = await eventually(welcomed, timeout=8)  # once the file is reloaded
        try:
            job = await clients.submit(matmul_spec(n=16))
            a = await expiring.next("assignment")
            expiring.accept(a)
            assert not expiring.ended.done()  # still valid: kept
            cancel = await expiring.next("cancel", timeout=30)
            assert cancel.lease_id == a.lease_id and "expired" in cancel.reason
            assert time.time() >= ident.principal.expires
            assert await expiring.status(timeout=5) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_EXPIRED")
        finally:
            await expiring.__aexit__()
        await requeued_then_paid_elsewhere(network, clients, job.job_id, "shortlived", ident.address, before)
    finally:
        await clients.close()
    books_are_clean(network)


async def test_a_revocation_closes_the_stream_on_another_replica(network: Network, pg_server: Any) -> None:
    """Each replica follows the same tokens file and closes its own streams."""
    dsn = pg_server.new_database()
    network.start_wallet()
    network.start_coordinator(coord_db=dsn)
    network.start_coordinator(coord_db=dsn, name="coordinator2")
    clients = Clients(network)
    address = network.ids["miner3"].address
    try:
        await clients.mint("client", 10**8)
        before = await clients.balance(network.ids["client"].address)
        two = network.target("coordinator2")
        async with Stream(network, "miner3", key_of(network, "miner3"), two) as revoked:
            await revoked.next("welcome")
            job = await clients.submit(matmul_spec(n=16))  # on the first replica
            revoked.accept(await revoked.next("assignment"))
            revoke(network, "miner3")
            assert await revoked.status(timeout=10) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_REVOKED")
        await requeued_then_paid_elsewhere(network, clients, job.job_id, "miner3", address, before,
                                           target=network.coord_target)  # fmt: skip
    finally:
        await clients.close()
    books_are_clean(network)


def standing(net: Network, miner_id: str) -> tuple[int, int]:
    lite = sqlite3.connect(net.root / "coordinator.sqlite")
    row = lite.execute("SELECT accepted, refused FROM miners WHERE miner_id = ?", (miner_id,)).fetchone()
    lite.close()
    return int(row[0]), int(row[1])


async def test_a_miner_that_heartbeats_but_never_finishes_loses_its_jobs(network: Network) -> None:
    """Heartbeats keep a connection, not a job: past the run-time bound
    (set low here) each job is cancelled, taken back and settled elsewhere,
    and the silent miner's reputation drops as for a refused result."""
    network.start_wallet()
    network.start_coordinator("--heartbeat-secs", "0.5", "--lease-secs", "3", "--run-bound-factor", "0.001",
                              "--run-bound-floor-secs", "3")  # fmt: skip
    clients = Clients(network)
    address = network.ids["miner3"].address
    try:
        await clients.mint("client", 10**8)
        before = await clients.balance(network.ids["client"].address)
        silent = Stream(network, "miner3", key_of(network, "miner3"), network.coord_target)
        silent.hello.capabilities.slots = 2
        async with silent:
            await silent.next("welcome")

            async def heartbeats() -> None:
                while True:
                    silent.out.put_nowait(cpb.ConnectRequest(heartbeat=cpb.MinerHeartbeat(free_slots=0)))
                    await asyncio.sleep(0.5)

            beating = asyncio.create_task(heartbeats())
            try:
                jobs = [await clients.submit(matmul_spec(n=16)) for _ in range(2)]
                held = [await silent.next("assignment") for _ in jobs]
                for a in held:
                    silent.accept(a)
                cancels = {(await silent.next("cancel", timeout=30)).lease_id for _ in held}
                assert cancels == {a.lease_id for a in held}
                for j in jobs:
                    got = await get_job(clients, j.job_id)
                    assert (got.state, got.attempts) == (cpb.JOB_STATE_QUEUED, 1), got
                lines = [json.loads(x) for x in network.log("coordinator").read_text().splitlines() if x[:1] == "{"]
                passed = [x for x in lines if x["event"] == "job_state" and "run-time bound" in (x["detail"] or "")]
                assert {x["job_id"] for x in passed} == {j.job_id for j in jobs}
                # Still connected (two refusals do not ban), and its late
                # result for a lease taken back is refused.
                assert not silent.ended.done()
                silent.deliver(held[0])
                late = await silent.next("ack")
                assert late.verdict == cpb.VERDICT_UNSPECIFIED and late.miner_amount == 0, late
                assert standing(network, "miner-3") == (0, 2)

                async with Stream(network, "miner2", key_of(network, "miner2"), network.coord_target) as honest:
                    await honest.next("welcome")
                    for _ in jobs:
                        a = await honest.next("assignment")
                        honest.accept(a)
                        honest.deliver(a)
                        assert (await honest.next("ack")).verdict == cpb.VERDICT_ACCEPTED
                    finals = [(await clients.watch(j.job_id))[-1] for j in jobs]
                assert not silent.ended.done()
            finally:
                beating.cancel()
        for f in finals:
            assert f.state == cpb.JOB_STATE_SETTLED and (f.miner_id, f.attempts) == ("miner-2", 2), f
            assert [r.miner_id for r in f.runs] == ["miner-2"]
        assert await clients.balance(network.ids["miner2"].address) == (sum(f.miner_amount for f in finals), 0)
        assert await clients.balance(address) == (0, 0)
        assert await clients.balance(network.ids["client"].address) == (before[0] - sum(f.price for f in finals), 0)
    finally:
        await clients.close()
    books_are_clean(network)


def test_run_bounds_follow_the_work_and_the_device() -> None:
    """Generous by construction: every repeat counts, half precision on a
    CPU counts ten times, a CPU counts more than a GPU, and nothing is under
    the floor."""
    from aitbc.workloads.registry import workload_of
    from coordinator_svc._jobs import Settings
    from tests.test_coordinator import long_spec

    class Bounds:
        settings = Settings(network_id="t")

    def bound(spec: cpb.JobSpec, gpu: bool = False) -> float:
        from coordinator_svc._jobs import Coordinator

        workload, params = workload_of(spec)
        return Coordinator.run_bound(Bounds(), workload, params, gpu)  # type: ignore[arg-type]

    small = matmul_spec(n=16)
    assert bound(small) == bound(small, gpu=True) == 300.0  # the floor
    long = long_spec()
    assert bound(long) > bound(long, gpu=True)
    more = cpb.JobSpec()
    more.CopyFrom(long)
    more.matmul.repeats = 100
    assert bound(more) > bound(long)
    half = cpb.JobSpec()
    half.CopyFrom(long)
    half.matmul.dtype = workloads_pb2.DTYPE_FP16
    assert bound(half) > bound(long)
    llm = cpb.JobSpec(llm_gen=workloads_pb2.LlmGenParams(model="m", prompt="hi", max_new_tokens=1024), max_price=1)
    assert bound(llm) >= 3 * 1024 * 2.0  # two seconds a token, three times over


async def test_the_replica_holding_a_silent_miners_stream_takes_its_job_back(network: Network, pg_server: Any) -> None:
    """With two replicas, the miner is still told to cancel: the replica that
    holds its stream acts first, the other only a lease later."""
    dsn = pg_server.new_database()
    flags = ("--heartbeat-secs", "0.5", "--lease-secs", "5", "--run-bound-factor", "0.001",
             "--run-bound-floor-secs", "2")  # fmt: skip
    network.start_wallet()
    network.start_coordinator(*flags, coord_db=dsn)
    network.start_coordinator(*flags, coord_db=dsn, name="coordinator2")
    clients = Clients(network)
    address = network.ids["miner3"].address
    try:
        await clients.mint("client", 10**8)
        before = await clients.balance(network.ids["client"].address)
        async with Stream(network, "miner3", key_of(network, "miner3"), network.target("coordinator2")) as silent:
            await silent.next("welcome")

            async def heartbeats() -> None:
                while True:
                    silent.out.put_nowait(cpb.ConnectRequest(heartbeat=cpb.MinerHeartbeat(free_slots=0)))
                    await asyncio.sleep(0.5)

            beating = asyncio.create_task(heartbeats())
            try:
                job = await clients.submit(matmul_spec(n=16))  # on the first replica
                a = await silent.next("assignment")
                silent.accept(a)
                assert (await silent.next("cancel", timeout=30)).lease_id == a.lease_id
            finally:
                beating.cancel()
        await requeued_then_paid_elsewhere(network, clients, job.job_id, "miner3", address, before,
                                           target=network.coord_target)  # fmt: skip
    finally:
        await clients.close()
    books_are_clean(network)
