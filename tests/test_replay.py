"""A valid receipt is good for one job, one lease, one miner, on one
network: replayed on a new stream, after a coordinator restart, for another
job or by another miner, it is refused and pays nothing. A small-order key
never gets registered. (Each flipped byte: tests/test_crypto.py.)"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from aitbc.rpc import error_reason
from aitbc.v1 import coordinator_pb2 as cpb
from aitbc.v1 import coordinator_pb2_grpc, workloads_pb2
from tests.cheaters import CheatingMiner
from tests.conftest import Network, md
from tests.test_crypto import SMALL_ORDER_KEYS
from tests.test_e2e import Clients

pytestmark = pytest.mark.timeout(180)


def spec(**policy: Any) -> cpb.JobSpec:
    s = cpb.JobSpec(
        matmul=workloads_pb2.MatmulParams(n=24, dtype=workloads_pb2.DTYPE_FP32, seed=secrets.randbits(32)),
        max_price=10**6,
    )
    if policy:
        s.verification.CopyFrom(cpb.VerificationPolicy(**policy))
    return s


def hello(net: Network, who: str, key: bytes | None = None) -> cpb.ConnectRequest:
    ident = net.ids[who]
    assert ident.key is not None
    return cpb.ConnectRequest(
        hello=cpb.MinerHello(
            miner_id=ident.principal.miner_id,
            public_key=key if key is not None else ident.key.public_key,
            payout_address=ident.address,
            capabilities=cpb.Capabilities(workloads=["matmul"], slots=1, accel=cpb.ACCEL_KIND_CPU),
        )
    )


async def replay_on_new_stream(net: Network, who: str, lease_id: str, data: bytes, receipt: Any) -> cpb.ResultAck:
    """Open a fresh stream and deliver an old result, unasked."""
    out: asyncio.Queue[cpb.ConnectRequest] = asyncio.Queue()
    out.put_nowait(hello(net, who))

    async def requests() -> AsyncIterator[cpb.ConnectRequest]:
        while True:
            yield await out.get()

    async with grpc.aio.insecure_channel(net.coord_target) as ch:
        call = coordinator_pb2_grpc.MinerGatewayServiceStub(ch).Connect(requests(), metadata=md(net.ids[who]))
        async for msg in call:
            if msg.WhichOneof("msg") == "welcome":
                out.put_nowait(cpb.ConnectRequest(chunk=cpb.ResultChunk(lease_id=lease_id, offset=0, data=data)))
                out.put_nowait(cpb.ConnectRequest(result=cpb.JobResult(lease_id=lease_id, receipt=receipt)))
            elif msg.WhichOneof("msg") == "ack":
                call.cancel()
                return msg.ack
    raise AssertionError("no ack")


async def test_a_receipt_is_good_once_and_nowhere_else(network: Network) -> None:
    network.start_wallet()
    network.start_coordinator("--max-attempts", "3")
    clients = Clients(network)
    try:
        await clients.mint("client", 10**8)
        shared: dict[str, Any] = {}
        honest = asyncio.create_task(CheatingMiner(network, "honest", ident="miner3", shared=shared).run_one())
        await asyncio.sleep(0.3)
        first = await clients.submit(spec())
        assert (await asyncio.wait_for(honest, 60)).verdict == cpb.VERDICT_ACCEPTED
        assert (await clients.watch(first.job_id))[-1].state == cpb.JOB_STATE_SETTLED
        paid = await clients.balance(network.ids["miner3"].address)
        data, receipt, lease = shared["result"][0], shared["signed"], shared["lease_id"]

        # On a new stream, by the miner that earned it: its lease is spent.
        ack = await replay_on_new_stream(network, "miner3", lease, data, receipt)
        assert ack.verdict == cpb.VERDICT_UNSPECIFIED and "lease" in ack.detail, ack

        # For another job: the receipt binds the first one.
        again = asyncio.create_task(CheatingMiner(network, "replay_receipt", ident="miner3", shared=shared).run_one())
        await asyncio.sleep(0.3)
        second = await clients.submit(spec())
        ack = await asyncio.wait_for(again, 60)
        assert ack.verdict == cpb.VERDICT_BAD_SIGNATURE and "binds the wrong" in ack.detail, ack
        await clients.coord.CancelJob(cpb.CancelJobRequest(job_id=second.job_id), metadata=md(network.ids["client"]))

        # By another miner, for the very job it was made for (run twice): the
        # key is not the other miner's.
        peer = asyncio.create_task(CheatingMiner(network, "honest", ident="miner3", shared=shared).run_one())
        await asyncio.sleep(0.3)
        third = await clients.submit(spec(redundant=cpb.RedundantPolicy(k=2)))
        assert (await asyncio.wait_for(peer, 60)).verdict == cpb.VERDICT_PENDING
        ack = await CheatingMiner(network, "replay_receipt", shared=shared).run_one()
        assert ack.verdict == cpb.VERDICT_BAD_SIGNATURE, ack
        await clients.coord.CancelJob(cpb.CancelJobRequest(job_id=third.job_id), metadata=md(network.ids["client"]))

        # After a restart, the spent lease is still spent.
        port = network.ports["coordinator"]
        network.stop("coordinator")
        network.start_coordinator("--max-attempts", "3", port=port)
        ack = await replay_on_new_stream(network, "miner3", lease, data, receipt)
        assert ack.verdict == cpb.VERDICT_UNSPECIFIED and "lease" in ack.detail, ack

        assert await clients.balance(network.ids["miner3"].address) == paid  # paid once, for the first
        assert await clients.balance(network.ids["cheater"].address) == (0, 0)
    finally:
        await clients.close()


@pytest.mark.parametrize("key", SMALL_ORDER_KEYS[:3])
async def test_a_small_order_key_is_refused_at_registration(network: Network, key: bytes) -> None:
    network.start_wallet()
    network.start_coordinator()

    async def requests() -> AsyncIterator[cpb.ConnectRequest]:
        yield hello(network, "miner2", key)
        await asyncio.sleep(30)

    async with grpc.aio.insecure_channel(network.coord_target) as ch:
        call = coordinator_pb2_grpc.MinerGatewayServiceStub(ch).Connect(requests(), metadata=md(network.ids["miner2"]))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in call:
                pass
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(err.value) == "BAD_PUBLIC_KEY"
