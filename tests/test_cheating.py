"""No dishonest result is ever paid: one cheating miner tries each trick in
turn against honest sidecars on the same jobs. The honest miners are paid,
the cheater never is, its reputation falls with every refusal, and at the
fourth it is banned."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import grpc
import pytest

from aitbc.rpc import error_reason
from aitbc.v1 import coordinator_pb2 as cpb
from aitbc.v1 import workloads_pb2
from tests.cheaters import CheatingMiner
from tests.conftest import Network, eventually, md
from tests.test_e2e import Clients

pytestmark = pytest.mark.timeout(300)


def embed_spec(*texts: str) -> cpb.JobSpec:
    return cpb.JobSpec(embed=workloads_pb2.EmbedParams(texts=list(texts)), max_price=10_000_000)


def matmul_spec(**policy: Any) -> cpb.JobSpec:
    spec = cpb.JobSpec(
        matmul=workloads_pb2.MatmulParams(n=48, dtype=workloads_pb2.DTYPE_FP32, seed=secrets.randbits(32)),
        max_price=10_000_000,
    )
    if policy:
        spec.verification.CopyFrom(cpb.VerificationPolicy(**policy))
    return spec


async def get(clients: Clients, job_id: str) -> cpb.Job:
    resp = await clients.coord.GetJob(cpb.GetJobRequest(job_id=job_id), metadata=md(clients.net.ids["client"]))
    return resp.job


async def pending_runs(clients: Clients, job_id: str, count: int) -> cpb.Job:
    async def check() -> cpb.Job:
        job = await get(clients, job_id)
        assert len(job.runs) == count and job.state == cpb.JOB_STATE_QUEUED, job
        return job

    return await eventually(check, timeout=60)


async def result_bytes(clients: Clients, job_id: str) -> bytes:
    chunks = clients.coord.GetJobResult(cpb.GetJobResultRequest(job_id=job_id), metadata=md(clients.net.ids["client"]))
    return b"".join([c.data async for c in chunks])


async def test_cheaters_are_never_paid_and_end_banned(network: Network, tiny_models: str) -> None:
    network.start_wallet()
    network.start_coordinator("--ban-after", "4", "--max-attempts", "3")
    clients = Clients(network)
    models = ("--models", tiny_models)
    try:
        await clients.mint("client", 10**9)
        reputations: list[float] = []
        paid = {"miner": 0, "miner2": 0, "miner3": 0}

        async def settled_without_the_cheater(job_id: str, honest: set[str]) -> cpb.Job:
            final = (await clients.watch(job_id))[-1]
            assert final.state == cpb.JOB_STATE_SETTLED, final.status_detail
            verdicts = {r.miner_id: cpb.Verdict.Name(r.verdict) for r in final.runs}
            assert verdicts["cheater-1"] != "VERDICT_ACCEPTED"
            assert {m for m, v in verdicts.items() if v == "VERDICT_ACCEPTED"} == honest
            reputations.append(next(r.reputation for r in final.runs if r.miner_id == "cheater-1"))
            return final

        # 1. Random output of the right shape: well formed, so only another
        #    miner's run can expose it. An honest miner runs first, the
        #    cheater second; they disagree, a third run decides.
        network.start_miner("miner", extra=models)
        job = await clients.submit(embed_spec("a gpu marketplace", "verified work"))
        await pending_runs(clients, job.job_id, 1)
        ack = await CheatingMiner(network, "random").run_one()
        assert ack.verdict == cpb.VERDICT_PENDING  # it cannot tell which side it is on
        network.start_miner("miner2", extra=models)
        first = await settled_without_the_cheater(job.job_id, {"miner-1", "miner-2"})
        network.stop("miner2")

        # 2. Another job's output, replayed (the same shape again).
        job = await clients.submit(embed_spec("tokens per second", "texts per second"))
        await pending_runs(clients, job.job_id, 1)
        replay = await result_bytes(clients, first.job_id)
        await CheatingMiner(network, "replay", replay=replay).run_one()
        network.start_miner("miner2", extra=models)
        await settled_without_the_cheater(job.job_id, {"miner-1", "miner-2"})
        network.stop("miner2")
        network.stop("miner")

        # 3. Half a matrix product: Freivalds' check refuses it at once and
        #    the job goes to an honest miner.
        cheat = asyncio.create_task(CheatingMiner(network, "partial").run_one())
        await asyncio.sleep(0.3)
        job = await clients.submit(matmul_spec())
        ack = await asyncio.wait_for(cheat, 60)
        assert ack.verdict == cpb.VERDICT_BAD_OUTPUT, ack.detail
        network.start_miner("miner", extra=models)
        await settled_without_the_cheater(job.job_id, {"miner-1"})
        network.stop("miner")

        # 4. A peer's result copied under the cheater's own signature
        #    (redundant): the copied receipt gives it away.
        shared: dict[str, Any] = {}
        peer = asyncio.create_task(CheatingMiner(network, "honest", ident="miner3", shared=shared).run_one())
        await asyncio.sleep(0.3)
        job = await clients.submit(matmul_spec(redundant=cpb.RedundantPolicy(k=2)))
        assert (await asyncio.wait_for(peer, 60)).verdict == cpb.VERDICT_PENDING
        ack = await CheatingMiner(network, "copy", shared=shared).run_one()
        assert ack.verdict == cpb.VERDICT_DISAGREED and "copies" in ack.detail, ack.detail
        network.start_miner("miner", extra=models)
        await settled_without_the_cheater(job.job_id, {"miner-3", "miner-1"})

        # Its reputation fell at every refusal; the fourth banned it.
        assert reputations == sorted(reputations, reverse=True) and len(set(reputations)) == 4, reputations
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await CheatingMiner(network, "honest").run_one()
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert error_reason(err.value) == "MINER_BANNED"

        # Never paid; every honest run paid once; the books balance.
        assert await clients.balance(network.ids["cheater"].address) == (0, 0)
        for who in paid:
            paid[who] = (await clients.balance(network.ids[who].address))[0]
        assert all(paid.values()), paid
        jobs = (await clients.coord.ListJobs(cpb.ListJobsRequest(), metadata=md(network.ids["client"]))).jobs
        assert all(j.state == cpb.JOB_STATE_SETTLED for j in jobs)
        assert sum(paid.values()) == sum(j.miner_amount for j in jobs)
        assert await clients.balance(network.ids["client"].address) == (10**9 - sum(j.price for j in jobs), 0)
    finally:
        await clients.close()
