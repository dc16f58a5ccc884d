"""The whole path with real processes on loopback: wallet, coordinator and
the miner sidecar (CPU torch), driven through gRPC as a client would."""

from __future__ import annotations

import asyncio
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from aitbc import crypto
from aitbc.rpc import error_reason
from aitbc.signed import open_signed
from aitbc.v1 import coordinator_pb2 as cpb
from aitbc.v1 import coordinator_pb2_grpc, signing_pb2, wallet_pb2, wallet_pb2_grpc, workloads_pb2
from tests.cheaters import CheatingMiner
from tests.conftest import ROOT, Network, eventually, md

pytestmark = pytest.mark.timeout(180)


def matmul_spec(
    n: int = 64, max_price: int = 100_000, dtype: workloads_pb2.Dtype.ValueType = workloads_pb2.DTYPE_FP32
) -> cpb.JobSpec:
    return cpb.JobSpec(matmul=workloads_pb2.MatmulParams(n=n, dtype=dtype, seed=7), max_price=max_price)


class Clients:
    def __init__(self, net: Network) -> None:
        self.net = net
        self.coord_channel = grpc.aio.insecure_channel(net.coord_target)
        self.wallet_channel = grpc.aio.insecure_channel(net.wallet_target)
        self.coord = coordinator_pb2_grpc.CoordinatorServiceStub(self.coord_channel)
        self.wallet = wallet_pb2_grpc.WalletServiceStub(self.wallet_channel)

    async def close(self) -> None:
        await self.coord_channel.close()
        await self.wallet_channel.close()

    async def mint(self, who: str, amount: int) -> None:
        await self.wallet.Mint(
            wallet_pb2.MintRequest(address=self.net.ids[who].address, amount=amount, request_id=secrets.token_hex(8)),
            metadata=md(self.net.ids["admin"]),
            timeout=10,
        )

    async def balance(self, address: str) -> tuple[int, int]:
        b = await self.wallet.GetBalance(
            wallet_pb2.GetBalanceRequest(address=address), metadata=md(self.net.ids["admin"]), timeout=10
        )
        return b.available, b.held

    async def submit(self, spec: cpb.JobSpec, who: str = "client", request_id: str = "") -> cpb.Job:
        resp = await self.coord.SubmitJob(
            cpb.SubmitJobRequest(spec=spec, request_id=request_id or secrets.token_hex(8)),
            metadata=md(self.net.ids[who]),
            timeout=10,
        )
        return resp.job

    async def watch(self, job_id: str, who: str = "client") -> list[cpb.Job]:
        seen = []
        async for ev in self.coord.WatchJob(
            cpb.WatchJobRequest(job_id=job_id), metadata=md(self.net.ids[who]), timeout=120
        ):
            seen.append(ev.job)
        return seen


@pytest.fixture
async def clients(network: Network) -> AsyncIterator[Clients]:
    network.start_wallet()
    network.start_coordinator("--max-attempts", "1", "--lease-secs", "10")
    c = Clients(network)
    try:
        yield c
    finally:
        await c.close()


def details(err: grpc.aio.AioRpcError) -> list[Any]:
    out: list[Any] = []
    for key, value in err.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            for d in status_pb2.Status.FromString(value).details:
                for cls in (error_details_pb2.ErrorInfo, error_details_pb2.BadRequest):
                    if d.Is(cls.DESCRIPTOR):
                        msg = cls()
                        d.Unpack(msg)
                        out.append(msg)
    return out


async def test_job_is_pushed_run_verified_and_paid(network: Network, clients: Clients) -> None:
    network.start_miner()
    await clients.mint("client", 1_000_000)
    job = await clients.submit(matmul_spec(n=96))
    states = [cpb.JobState.Name(j.state) for j in await clients.watch(job.job_id)]
    assert states[-1] == "JOB_STATE_SETTLED", states
    # One snapshot per state change, in lifecycle order (progress reports
    # may repeat RUNNING).
    distinct = [s for i, s in enumerate(states) if i == 0 or s != states[i - 1]]
    order = ["JOB_STATE_QUEUED", "JOB_STATE_ASSIGNED", "JOB_STATE_RUNNING", "JOB_STATE_VERIFYING"]
    assert [s for s in distinct if s in order] == sorted(set(distinct) & set(order), key=order.index)

    final = (await clients.coord.GetJob(cpb.GetJobRequest(job_id=job.job_id), metadata=md(network.ids["client"]))).job
    assert final.verdict == cpb.VERDICT_ACCEPTED and final.attempts == 1 and final.miner_id == "miner-1"
    assert final.miner_amount + final.fee_amount == final.price == job.price > 0
    assert await clients.balance(network.ids["client"].address) == (1_000_000 - final.price, 0)
    assert await clients.balance(network.ids["miner"].address) == (final.miner_amount, 0)
    assert await clients.balance(network.treasury) == (final.fee_amount, 0)

    # Anyone with the public keys can check the receipt and settlement offline.
    miner_key = (network.root / "miner" / "miner.key").read_text().strip()
    receipt = open_signed(
        final.receipt,
        crypto.RECEIPT_DOMAIN,
        crypto.KeyPair(bytes.fromhex(miner_key)).public_key,
        signing_pb2.ReceiptBody,
    )
    assert receipt.job_id == job.job_id and receipt.output_sha256 == final.output_sha256
    assert receipt.usage.flops == 2 * 96**3 and receipt.usage.device == "cpu"
    settlement = open_signed(
        final.settlement, crypto.SETTLEMENT_DOMAIN, network.coordinator_key.public_key, signing_pb2.SettlementBody
    )
    assert settlement.miner_amount == final.miner_amount
    assert settlement.receipt_sha256 == crypto.sha256(final.receipt.body)

    # Resubmitting with the same request id is the same job, not a second hold.
    again = await clients.submit(matmul_spec(n=96), request_id="same")
    assert (await clients.submit(matmul_spec(n=96), request_id="same")).job_id == again.job_id
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await clients.submit(matmul_spec(n=97), request_id="same")
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    await clients.watch(again.job_id)

    network.stop_all()
    check = subprocess.run(
        [
            sys.executable,
            "-m",
            "wallet_svc",
            "check",
            "--db",
            str(network.root / "wallet.sqlite"),
            "--treasury-address",
            network.treasury,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "clean" in check.stdout


async def test_a_client_without_funds_is_refused_and_nothing_is_held(clients: Clients, network: Network) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await clients.submit(matmul_spec(), who="client2")
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(err.value) == "INSUFFICIENT_FUNDS"
    assert await clients.balance(network.ids["client2"].address) == (0, 0)
    # Funded, the same request id now goes through.
    await clients.mint("client2", 50_000)
    job = await clients.submit(matmul_spec(max_price=50_000), who="client2", request_id="retry-me")
    assert job.state == cpb.JOB_STATE_QUEUED
    assert await clients.balance(network.ids["client2"].address) == (0, 50_000)


async def test_bad_requests_get_clear_statuses(clients: Clients, network: Network) -> None:
    await clients.mint("client", 1_000_000)
    cases = [
        (cpb.JobSpec(max_price=10), "INVALID_ARGUMENT", "spec.workload"),
        (matmul_spec(n=0), "INVALID_ARGUMENT", "spec.matmul.n"),
        (matmul_spec(n=16385), "INVALID_ARGUMENT", "spec.matmul.n"),
        # 256 MiB of fp32 output: over the default MAX_RESULT_BYTES (64 MiB).
        (matmul_spec(n=8192), "INVALID_ARGUMENT", "spec.matmul.n"),
        (matmul_spec(n=8, dtype=workloads_pb2.DTYPE_UNSPECIFIED), "INVALID_ARGUMENT", "spec.matmul.dtype"),
        (matmul_spec(max_price=0), "INVALID_ARGUMENT", "spec.max_price"),
        (matmul_spec(n=4096, max_price=1_001), "FAILED_PRECONDITION", None),
    ]
    for spec, code, field in cases:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await clients.submit(spec)
        assert err.value.code().name == code, (spec, err.value.details())
        infos = details(err.value)
        assert any(isinstance(d, error_details_pb2.ErrorInfo) and d.domain == "aitbc.dev" for d in infos)
        if field:
            assert any(
                isinstance(d, error_details_pb2.BadRequest) and d.field_violations[0].field == field for d in infos
            )
    # Who may call what.
    req = cpb.SubmitJobRequest(spec=matmul_spec(), request_id="x")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await clients.coord.SubmitJob(req)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await clients.coord.SubmitJob(req, metadata=(("authorization", "Bearer forged"),))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await clients.coord.SubmitJob(req, metadata=md(network.ids["miner"]))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await clients.wallet.Mint(
            wallet_pb2.MintRequest(address=network.ids["client"].address, amount=5, request_id="x"),
            metadata=md(network.ids["client"]),
        )
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # Another client's job does not exist for you.
    job = await clients.submit(matmul_spec())
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await clients.coord.GetJob(cpb.GetJobRequest(job_id=job.job_id), metadata=md(network.ids["client2"]))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("mode", "verdict"),
    [
        ("flipped_byte", "VERDICT_BAD_SIGNATURE"),
        ("other_key", "VERDICT_BAD_SIGNATURE"),
        ("wrong_c", "VERDICT_BAD_OUTPUT"),
    ],
)
async def test_dishonest_results_are_refused_and_nothing_is_paid(
    clients: Clients, network: Network, mode: str, verdict: str
) -> None:
    await clients.mint("client", 1_000_000)
    cheater = asyncio.create_task(CheatingMiner(network, mode).run_one())
    await asyncio.sleep(0.3)  # let it connect; the job is pushed either way
    job = await clients.submit(matmul_spec(n=32))
    ack = await asyncio.wait_for(cheater, 60)
    assert cpb.Verdict.Name(ack.verdict) == verdict, ack.detail
    states = await clients.watch(job.job_id)
    assert states[-1].state == cpb.JOB_STATE_FAILED, states[-1]
    assert cpb.Verdict.Name(states[-1].verdict) == verdict

    async def released() -> None:
        assert await clients.balance(network.ids["client"].address) == (1_000_000, 0)

    await eventually(released)
    assert await clients.balance(network.ids["cheater"].address) == (0, 0)
    assert await clients.balance(network.treasury) == (0, 0)


async def test_a_refused_result_is_retried_on_another_miner_and_paid_once(network: Network) -> None:
    network.start_wallet()
    network.start_coordinator("--max-attempts", "3")
    clients = Clients(network)
    try:
        await clients.mint("client", 1_000_000)
        cheater = asyncio.create_task(CheatingMiner(network, "wrong_c").run_one())
        await asyncio.sleep(0.3)
        job = await clients.submit(matmul_spec(n=32))
        ack = await asyncio.wait_for(cheater, 60)
        assert ack.verdict == cpb.VERDICT_BAD_OUTPUT
        # The cheater reconnects and stays; the job must still go elsewhere.
        cheater_again = asyncio.create_task(CheatingMiner(network, "wrong_c").run_one())
        network.start_miner()
        final = (await clients.watch(job.job_id))[-1]
        cheater_again.cancel()
        assert final.state == cpb.JOB_STATE_SETTLED, final.status_detail
        assert final.miner_id == "miner-1" and final.attempts == 2
        assert await clients.balance(network.ids["miner"].address) == (final.miner_amount, 0)
        assert await clients.balance(network.ids["cheater"].address) == (0, 0)
        assert await clients.balance(network.ids["client"].address) == (1_000_000 - final.price, 0)
    finally:
        await clients.close()


async def test_settlements_wait_out_a_30_second_wallet_outage_and_pay_once(network: Network) -> None:
    network.start_wallet()
    network.start_coordinator("--lease-secs", "10")
    network.start_miner()
    clients = Clients(network)
    try:
        await clients.mint("client", 10_000_000)
        jobs = [await clients.submit(matmul_spec(n=16)) for _ in range(20)]
        wallet_port = network.ports["wallet"]
        network.stop("wallet", signal.SIGKILL)
        down_at = time.monotonic()

        async def all_settling() -> None:
            for job in jobs:
                req = cpb.GetJobRequest(job_id=job.job_id)
                got = await clients.coord.GetJob(req, metadata=md(network.ids["client"]))
                assert got.job.state == cpb.JOB_STATE_SETTLING, cpb.JobState.Name(got.job.state)

        await eventually(all_settling, timeout=60)
        # The wallet stays down for 30 s: the outbox keeps failing and backs off.
        await asyncio.sleep(max(0.0, 30 - (time.monotonic() - down_at)))
        network.start_wallet(port=wallet_port)
        await clients.wallet_channel.close()
        clients.wallet_channel = grpc.aio.insecure_channel(network.wallet_target)
        clients.wallet = wallet_pb2_grpc.WalletServiceStub(clients.wallet_channel)
        finals = [(await clients.watch(job.job_id))[-1] for job in jobs]
        assert all(f.state == cpb.JOB_STATE_SETTLED for f in finals)
        paid = sum(f.miner_amount for f in finals)
        assert await clients.balance(network.ids["miner"].address) == (paid, 0)
        assert await clients.balance(network.ids["client"].address) == (10_000_000 - sum(f.price for f in finals), 0)
    finally:
        await clients.close()


async def test_a_miner_caught_cheating_repeatedly_is_banned(network: Network) -> None:
    network.start_wallet()
    network.start_coordinator("--max-attempts", "1", "--ban-after", "2")
    clients = Clients(network)
    try:
        await clients.mint("client", 1_000_000)
        for _ in range(2):
            cheater = asyncio.create_task(CheatingMiner(network, "wrong_c").run_one())
            await asyncio.sleep(0.3)
            job = await clients.submit(matmul_spec(n=16))
            ack = await asyncio.wait_for(cheater, 60)
            assert ack.verdict == cpb.VERDICT_BAD_OUTPUT
            assert (await clients.watch(job.job_id))[-1].state == cpb.JOB_STATE_FAILED
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await CheatingMiner(network, "wrong_c").run_one()
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert error_reason(err.value) == "MINER_BANNED"
        assert await clients.balance(network.ids["cheater"].address) == (0, 0)
    finally:
        await clients.close()


async def test_a_submit_that_met_a_dead_wallet_completes_on_retry(network: Network) -> None:
    network.start_wallet()
    network.start_coordinator()
    clients = Clients(network)
    try:
        await clients.mint("client", 1_000_000)
        wallet_port = network.ports["wallet"]
        network.stop("wallet", signal.SIGKILL)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await clients.submit(matmul_spec(n=16), request_id="patient")
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert error_reason(err.value) == "WALLET_UNAVAILABLE"
        network.start_wallet(port=wallet_port)
        job = await clients.submit(matmul_spec(n=16), request_id="patient")
        assert job.state == cpb.JOB_STATE_QUEUED
        network.start_miner()
        final = (await clients.watch(job.job_id))[-1]
        assert final.state == cpb.JOB_STATE_SETTLED
    finally:
        await clients.close()
