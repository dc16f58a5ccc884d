"""What one caller can take from a server: calls per second, open streams,
message size and pings. Each limit refuses the one who passes it, with a
clear status, while everyone else and the health checks carry on."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aitbc.rpc import error_reason
from aitbc.server import MAX_MESSAGE_BYTES
from aitbc.v1 import coordinator_pb2 as cpb
from aitbc.v1 import coordinator_pb2_grpc, workloads_pb2
from tests.conftest import Network, md
from tests.test_e2e import Clients, matmul_spec

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def clients(network: Network) -> AsyncIterator[Clients]:
    network.start_wallet()
    network.start_coordinator("--rate-limits", "client=20", "--streams-per-identity", "4")
    c = Clients(network)
    await c.mint("client", 10**8)
    await c.mint("client2", 10**8)
    try:
        yield c
    finally:
        await c.close()


def retry_delay(err: grpc.aio.AioRpcError) -> float:
    for key, value in err.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            for d in status_pb2.Status.FromString(value).details:
                if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                    info = error_details_pb2.RetryInfo()
                    d.Unpack(info)
                    return info.retry_delay.ToTimedelta().total_seconds()
    return 0.0


async def healthy(target: str) -> None:
    async with grpc.aio.insecure_channel(target) as ch:
        resp = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


async def test_a_caller_past_its_rate_gets_resource_exhausted_with_retry_info(clients: Clients) -> None:
    net = clients.net
    req = cpb.ListJobsRequest()
    refused = None
    for _ in range(200):
        try:
            await clients.coord.ListJobs(req, metadata=md(net.ids["client"]), timeout=5)
        except grpc.aio.AioRpcError as err:
            refused = err
            break
    assert refused is not None, "200 calls in a burst were all admitted"
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and error_reason(refused) == "RATE_LIMITED"
    delay = retry_delay(refused)
    assert 0 < delay <= 1.0
    # Another client is not slowed by it; the first may go again after the delay.
    await clients.coord.ListJobs(req, metadata=md(net.ids["client2"]), timeout=5)
    await asyncio.sleep(delay)
    await clients.coord.ListJobs(req, metadata=md(net.ids["client"]), timeout=5)


async def test_streams_past_the_cap_are_refused_while_health_answers(clients: Clients) -> None:
    net = clients.net
    job = await clients.submit(matmul_spec())  # no miner: it stays queued and its watches stay open
    streams: list[Any] = []
    for _ in range(4):
        call = clients.coord.WatchJob(cpb.WatchJobRequest(job_id=job.job_id), metadata=md(net.ids["client"]))
        await call.read()  # the first snapshot: the stream is open
        streams.append(call)
    extra = clients.coord.WatchJob(cpb.WatchJobRequest(job_id=job.job_id), metadata=md(net.ids["client"]))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await extra.read()
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and error_reason(err.value) == "TOO_MANY_STREAMS"
    await healthy(net.coord_target)
    other = clients.coord.WatchJob(cpb.WatchJobRequest(job_id=job.job_id), metadata=md(net.ids["client"]))
    streams.pop().cancel()
    await asyncio.sleep(0.2)
    assert (await other.read()).job.job_id == job.job_id  # a closed stream frees its place
    for s in [*streams, other]:
        s.cancel()


async def test_a_message_one_byte_over_the_limit_is_refused_and_the_server_stays_up(clients: Clients) -> None:
    net = clients.net

    def request(size: int) -> cpb.SubmitJobRequest:
        req = cpb.SubmitJobRequest(request_id="big", spec=cpb.JobSpec(embed=workloads_pb2.EmbedParams(texts=[""])))
        n = size - req.ByteSize()
        while True:  # nested length prefixes grow with the text: settle just under
            req.spec.embed.texts[0] = "x" * n
            if req.ByteSize() <= size:
                break
            n -= 1
        req.request_id += "y" * (size - req.ByteSize())  # then make up the last bytes exactly
        assert req.ByteSize() == size
        return req

    options = [("grpc.max_send_message_length", 64 * 2**20)]
    async with grpc.aio.insecure_channel(net.coord_target, options=options) as ch:
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.SubmitJob(request(MAX_MESSAGE_BYTES + 1), metadata=md(net.ids["client"]), timeout=10)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # At the limit it is read, and then refused for what it says.
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.SubmitJob(request(MAX_MESSAGE_BYTES), metadata=md(net.ids["client"]), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    await healthy(net.coord_target)


async def test_a_client_pinging_every_10ms_gets_goaway_and_others_do_not(clients: Clients) -> None:
    net = clients.net
    flood = [
        ("grpc.keepalive_time_ms", 10),
        ("grpc.keepalive_timeout_ms", 1000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    job = await clients.submit(matmul_spec(), who="client2")
    async with grpc.aio.insecure_channel(net.coord_target, options=flood) as ch:
        watch = coordinator_pb2_grpc.CoordinatorServiceStub(ch).WatchJob(
            cpb.WatchJobRequest(job_id=job.job_id), metadata=md(net.ids["client2"])
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in watch:  # the job never changes: only the pings are traffic
                pass
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
        assert "too many pings" in (err.value.details() or "").lower(), err.value  # the GOAWAY reason
    # The polite client on its own connection never noticed.
    got = await clients.coord.ListJobs(cpb.ListJobsRequest(), metadata=md(net.ids["client"]), timeout=5)
    assert got is not None
    await healthy(net.coord_target)
