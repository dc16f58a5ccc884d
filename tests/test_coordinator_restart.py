"""SIGKILL the coordinator at random points while it works through 200 jobs,
ten times over: every job still ends, none is lost, none is paid twice."""

from __future__ import annotations

import asyncio
import random
import signal
import subprocess
import sys

import grpc
import pytest

from aitbc.v1 import coordinator_pb2 as cpb
from aitbc.v1 import coordinator_pb2_grpc
from tests.conftest import ROOT, Network, eventually, md
from tests.test_e2e import Clients, matmul_spec

pytestmark = pytest.mark.timeout(600)

RUNS = 10
JOBS = 200
TERMINAL = {cpb.JOB_STATE_SETTLED, cpb.JOB_STATE_FAILED, cpb.JOB_STATE_CANCELLED, cpb.JOB_STATE_EXPIRED}
TRANSIENT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}


async def submit_with_retries(network: Network, request_id: str) -> str:
    """What a careful client does: retry transient failures with the same
    request id until the coordinator answers."""
    while True:
        try:
            async with grpc.aio.insecure_channel(network.coord_target) as ch:
                stub = coordinator_pb2_grpc.CoordinatorServiceStub(ch)
                resp = await stub.SubmitJob(
                    cpb.SubmitJobRequest(spec=matmul_spec(n=8, max_price=50_000), request_id=request_id),
                    metadata=md(network.ids["client"]),
                    timeout=5,
                )
                return str(resp.job.job_id)
        except grpc.aio.AioRpcError as err:
            if err.code() not in TRANSIENT:
                raise
            await asyncio.sleep(0.2)


async def all_jobs(network: Network) -> dict[str, cpb.Job]:
    jobs: dict[str, cpb.Job] = {}
    token = ""
    async with grpc.aio.insecure_channel(network.coord_target) as ch:
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(ch)
        while True:
            page = await stub.ListJobs(
                cpb.ListJobsRequest(page_size=500, page_token=token), metadata=md(network.ids["client"]), timeout=10
            )
            jobs.update({j.job_id: j for j in page.jobs})
            token = page.next_page_token
            if not token:
                return jobs


async def test_coordinator_sigkill_loses_no_job_and_pays_none_twice(network: Network) -> None:
    rng = random.Random(2026)
    network.start_wallet()
    # 200 submits and their polling in a few seconds: far past a client's
    # default rate limit, which is not what this test is about.
    limits = ("--rate-limits", "client=2000")
    network.start_coordinator("--lease-secs", "5", "--heartbeat-secs", "1", *limits)
    port = network.ports["coordinator"]
    network.start_miner("miner")
    clients = Clients(network)
    minted = 10**11
    await clients.mint("client", minted)
    submitted: dict[str, str] = {}
    sem = asyncio.Semaphore(8)

    async def one(request_id: str) -> None:
        async with sem:
            submitted[request_id] = await submit_with_retries(network, request_id)

    for run in range(RUNS):
        work = asyncio.gather(*(one(f"run{run}-job{i}") for i in range(JOBS)))
        await asyncio.sleep(rng.uniform(0.05, 3.0))
        network.stop("coordinator", signal.SIGKILL)
        await asyncio.sleep(rng.uniform(0.0, 0.5))
        network.start_coordinator("--lease-secs", "5", "--heartbeat-secs", "1", *limits, port=port)
        await work

        async def settled_down() -> None:
            jobs = await all_jobs(network)
            open_jobs = [j for j in submitted.values() if jobs[j].state not in TERMINAL]
            assert not open_jobs, f"{len(open_jobs)} job(s) still open, e.g. {jobs[open_jobs[0]]}"

        await eventually(settled_down, timeout=120, interval=0.5)

    jobs = await all_jobs(network)
    assert len(submitted) == RUNS * JOBS
    assert len(set(submitted.values())) == RUNS * JOBS, "a retried submit made a second job"
    assert set(submitted.values()) <= set(jobs)
    settled = [j for j in jobs.values() if j.state == cpb.JOB_STATE_SETTLED]
    assert len(settled) >= RUNS * JOBS * 0.95, f"only {len(settled)} settled"

    async def books_add_up() -> None:
        assert await clients.balance(network.ids["miner"].address) == (sum(j.miner_amount for j in settled), 0)
        assert await clients.balance(network.treasury) == (sum(j.fee_amount for j in settled), 0)
        assert await clients.balance(network.ids["client"].address) == (minted - sum(j.price for j in settled), 0)

    await eventually(books_add_up, timeout=60)
    await clients.close()
    network.stop_all()
    check = subprocess.run(
        [sys.executable, "-m", "wallet_svc", "check", "--db", str(network.root / "wallet.sqlite"),
         "--treasury-address", network.treasury],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert check.returncode == 0, check.stdout
