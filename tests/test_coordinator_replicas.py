"""Two coordinator replicas on one PostgreSQL: miners on either, jobs
submitted to either, each job run by one miner and paid once, and a job
submitted where no miner is free wakes the replica that has one."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import grpc
import pytest

from aitbc.v1 import coordinator_pb2 as cpb
from aitbc.v1 import coordinator_pb2_grpc
from tests.conftest import Network, md
from tests.test_e2e import Clients, matmul_spec

pytestmark = pytest.mark.timeout(240)


async def test_two_replicas_share_the_work_and_pay_each_job_once(network: Network, pg_server: Any) -> None:
    dsn = pg_server.new_database()
    network.start_wallet()
    network.start_coordinator("--heartbeat-secs", "0.5", coord_db=dsn)
    network.start_coordinator("--heartbeat-secs", "0.5", coord_db=dsn, name="coordinator2")
    network.start_miner("miner", coordinator="coordinator")
    network.start_miner("miner2", coordinator="coordinator2")
    clients = Clients(network)
    channels = [grpc.aio.insecure_channel(network.target(n)) for n in ("coordinator", "coordinator2")]
    stubs = [coordinator_pb2_grpc.CoordinatorServiceStub(ch) for ch in channels]
    who = md(network.ids["client"])
    try:
        await clients.mint("client", 100_000_000)

        async def run_one(i: int) -> cpb.Job:
            submit_to, watch_on = stubs[i % 2], stubs[(i + 1) % 2]
            job = (
                await submit_to.SubmitJob(
                    cpb.SubmitJobRequest(spec=matmul_spec(n=8), request_id=secrets.token_hex(6)), metadata=who
                )
            ).job
            # Watched on the other replica: it sees every change all the same.
            events = [e.job async for e in watch_on.WatchJob(cpb.WatchJobRequest(job_id=job.job_id), metadata=who)]
            return events[-1]

        finals = await asyncio.gather(*(run_one(i) for i in range(40)))
        assert all(f.state == cpb.JOB_STATE_SETTLED for f in finals), [f.status_detail for f in finals]
        assert all(f.attempts == 1 for f in finals)
        by_miner = {m: [f for f in finals if f.miner_id == m] for m in ("miner-1", "miner-2")}
        assert await clients.balance(network.ids["miner"].address) == (
            sum(f.miner_amount for f in by_miner["miner-1"]),
            0,
        )
        assert await clients.balance(network.ids["miner2"].address) == (
            sum(f.miner_amount for f in by_miner["miner-2"]),
            0,
        )
        assert await clients.balance(network.ids["client"].address) == (
            100_000_000 - sum(f.price for f in finals),
            0,
        )

        # No free miner where the job arrives: the other replica's miner runs it.
        network.stop("miner")
        job = (
            await stubs[0].SubmitJob(
                cpb.SubmitJobRequest(spec=matmul_spec(n=8), request_id="to-the-other"), metadata=who
            )
        ).job
        final = [e.job async for e in stubs[0].WatchJob(cpb.WatchJobRequest(job_id=job.job_id), metadata=who)][-1]
        assert final.state == cpb.JOB_STATE_SETTLED and final.miner_id == "miner-2"
    finally:
        for ch in channels:
            await ch.close()
        await clients.close()
