"""The coordinator when things go wrong: miners killed or paused mid-job,
cancels, deadlines, listing and fetching results — real processes."""

from __future__ import annotations

import asyncio
import hashlib
import signal
import time
from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from aitbc.rpc import error_reason
from aitbc.v1 import coordinator_pb2 as cpb
from aitbc.v1 import workloads_pb2
from aitbc.workloads.matmul import MatmulParams, freivalds
from tests.conftest import Network, eventually, md
from tests.test_e2e import Clients, matmul_spec

pytestmark = pytest.mark.timeout(240)


def long_spec(max_price: int = 10_000_000) -> cpb.JobSpec:
    """A few seconds of CPU: long enough to kill or pause a miner mid-run."""
    return cpb.JobSpec(
        matmul=workloads_pb2.MatmulParams(n=2048, dtype=workloads_pb2.DTYPE_FP32, seed=3, repeats=60),
        max_price=max_price,
    )


@pytest.fixture
async def net(network: Network) -> AsyncIterator[tuple[Network, Clients]]:
    network.start_wallet()
    network.start_coordinator("--lease-secs", "3", "--heartbeat-secs", "0.5")
    clients = Clients(network)
    await clients.mint("client", 100_000_000)
    try:
        yield network, clients
    finally:
        await clients.close()


async def get(clients: Clients, job_id: str) -> cpb.Job:
    resp = await clients.coord.GetJob(cpb.GetJobRequest(job_id=job_id), metadata=md(clients.net.ids["client"]))
    return resp.job


async def running_on(clients: Clients, job_id: str, miner_id: str) -> None:
    async def check() -> None:
        job = await get(clients, job_id)
        assert job.state == cpb.JOB_STATE_RUNNING and job.miner_id == miner_id, job

    await eventually(check, timeout=60)


async def test_a_killed_miners_job_completes_elsewhere_and_is_paid_once(net: tuple[Network, Clients]) -> None:
    network, clients = net
    network.start_miner("miner")
    network.start_miner("miner2")
    job = await clients.submit(long_spec())
    await running_on(clients, job.job_id, "miner-1")
    network.stop("miner", signal.SIGKILL)
    final = (await clients.watch(job.job_id))[-1]
    assert final.state == cpb.JOB_STATE_SETTLED, final.status_detail
    assert (final.miner_id, final.attempts) == ("miner-2", 2)
    assert await clients.balance(network.ids["miner2"].address) == (final.miner_amount, 0)
    assert await clients.balance(network.ids["miner"].address) == (0, 0)


async def test_a_paused_miner_loses_its_lease_and_its_late_result_is_refused(net: tuple[Network, Clients]) -> None:
    network, clients = net
    network.start_miner("miner")
    network.start_miner("miner2")
    job = await clients.submit(long_spec())
    await running_on(clients, job.job_id, "miner-1")
    network.procs["miner"].send_signal(signal.SIGSTOP)
    try:
        final = (await clients.watch(job.job_id))[-1]
    finally:
        network.procs["miner"].send_signal(signal.SIGCONT)
    assert final.state == cpb.JOB_STATE_SETTLED, final.status_detail
    assert final.miner_id == "miner-2"
    # The resumed miner's work under the old lease earns nothing.
    await asyncio.sleep(5)
    assert await clients.balance(network.ids["miner"].address) == (0, 0)
    assert await clients.balance(network.ids["miner2"].address) == (final.miner_amount, 0)
    assert (await get(clients, job.job_id)).state == cpb.JOB_STATE_SETTLED


async def test_cancel_stops_the_job_and_refunds_the_hold(net: tuple[Network, Clients]) -> None:
    network, clients = net
    network.start_miner("miner")
    client = network.ids["client"].address
    before = await clients.balance(client)
    job = await clients.submit(long_spec(max_price=5_000_000))
    await running_on(clients, job.job_id, "miner-1")
    cancel = cpb.CancelJobRequest(job_id=job.job_id)
    cancelled = (await clients.coord.CancelJob(cancel, metadata=md(network.ids["client"]))).job
    assert cancelled.state == cpb.JOB_STATE_CANCELLED
    # Idempotent, and nobody else's to cancel.
    again = (await clients.coord.CancelJob(cancel, metadata=md(network.ids["client"]))).job
    assert again.state == cpb.JOB_STATE_CANCELLED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await clients.coord.CancelJob(cancel, metadata=md(network.ids["client2"]))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND

    async def refunded() -> None:
        assert await clients.balance(client) == before

    await eventually(refunded)

    async def worker_killed() -> None:
        assert '"reason": "cancelled"' in network.log("miner").read_text()

    await eventually(worker_killed)  # the job stopped, not just its result discarded
    # The miner is free for new work, and a settled job cannot be cancelled.
    small = await clients.submit(matmul_spec(n=16))
    done = (await clients.watch(small.job_id))[-1]
    assert done.state == cpb.JOB_STATE_SETTLED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await clients.coord.CancelJob(cpb.CancelJobRequest(job_id=small.job_id), metadata=md(network.ids["client"]))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(err.value) == "NOT_CANCELLABLE"
    assert await clients.balance(network.ids["miner"].address) == (done.miner_amount, 0)


async def test_a_job_past_its_deadline_expires_and_is_refunded(net: tuple[Network, Clients]) -> None:
    network, clients = net
    client = network.ids["client"].address
    before = await clients.balance(client)
    spec = matmul_spec(n=16, dtype=workloads_pb2.DTYPE_FP32)
    spec.deadline_time.FromNanoseconds(int((time.time() + 1.5) * 1e9))
    job = await clients.submit(spec)  # no miner is connected: it can only wait
    final = (await clients.watch(job.job_id))[-1]
    assert final.state == cpb.JOB_STATE_EXPIRED

    async def refunded() -> None:
        assert await clients.balance(client) == before

    await eventually(refunded)
    past = matmul_spec(n=16)
    past.deadline_time.CopyFrom(Timestamp(seconds=int(time.time()) - 10))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await clients.submit(past)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_job_nobody_can_run_says_why(net: tuple[Network, Clients]) -> None:
    network, clients = net
    network.start_miner("miner")
    spec = matmul_spec(n=16)
    spec.requirements.gpu_required = True
    job = await clients.submit(spec)

    async def explained() -> None:
        got = await get(clients, job.job_id)
        assert got.state == cpb.JOB_STATE_QUEUED and got.status_detail == "no connected miner has a GPU"

    await eventually(explained)
    spec.requirements.gpu_required = False
    spec.requirements.min_vram_bytes = 24 * 2**30
    job = await clients.submit(spec)

    async def explained_vram() -> None:
        got = await get(clients, job.job_id)
        assert got.status_detail == "no connected miner has 24.0 GiB of VRAM", got.status_detail

    await eventually(explained_vram)


async def test_jobs_are_listed_newest_first_by_page_and_state(net: tuple[Network, Clients]) -> None:
    network, clients = net
    ids = [(await clients.submit(matmul_spec(n=8))).job_id for _ in range(5)]
    seen: list[str] = []
    token = ""
    while True:
        page = await clients.coord.ListJobs(
            cpb.ListJobsRequest(page_size=2, page_token=token), metadata=md(network.ids["client"])
        )
        assert len(page.jobs) <= 2
        seen += [j.job_id for j in page.jobs]
        token = page.next_page_token
        if not token:
            break
    assert seen == ids[::-1]
    queued = await clients.coord.ListJobs(
        cpb.ListJobsRequest(states=[cpb.JOB_STATE_QUEUED]), metadata=md(network.ids["client"])
    )
    assert len(queued.jobs) == 5
    settled = await clients.coord.ListJobs(
        cpb.ListJobsRequest(states=[cpb.JOB_STATE_SETTLED]), metadata=md(network.ids["client"])
    )
    assert len(settled.jobs) == 0
    other = await clients.coord.ListJobs(cpb.ListJobsRequest(), metadata=md(network.ids["client2"]))
    assert len(other.jobs) == 0
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await clients.coord.ListJobs(cpb.ListJobsRequest(page_token="nonsense"), metadata=md(network.ids["client"]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_results_larger_than_a_message_stream_back_intact(net: tuple[Network, Clients]) -> None:
    network, clients = net
    network.start_miner("miner")
    spec = cpb.JobSpec(
        matmul=workloads_pb2.MatmulParams(n=1536, dtype=workloads_pb2.DTYPE_FP32, seed=11), max_price=10_000_000
    )
    job = await clients.submit(spec)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in clients.coord.GetJobResult(
            cpb.GetJobResultRequest(job_id=job.job_id), metadata=md(network.ids["client"])
        ):
            pass
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # not verified yet
    final = (await clients.watch(job.job_id))[-1]
    assert final.state == cpb.JOB_STATE_SETTLED
    chunks = [
        c
        async for c in clients.coord.GetJobResult(
            cpb.GetJobResultRequest(job_id=job.job_id), metadata=md(network.ids["client"])
        )
    ]
    data = b"".join(c.data for c in chunks)
    assert len(chunks) >= 9  # 9 MiB in 1 MiB chunks
    assert chunks[0].total_size_bytes == len(data) == 1536 * 1536 * 4
    assert hashlib.sha256(data).digest() == chunks[0].output_sha256 == final.output_sha256
    assert freivalds(MatmulParams(n=1536, dtype="fp32", seed=11), data).ok


async def test_sigterm_drains_the_running_job_takes_no_more_and_exits_0(net: tuple[Network, Clients]) -> None:
    network, clients = net
    network.start_miner("miner")
    spec = cpb.JobSpec(
        matmul=workloads_pb2.MatmulParams(n=2048, dtype=workloads_pb2.DTYPE_FP32, seed=5, repeats=25),
        max_price=10_000_000,
    )
    running = await clients.submit(spec)
    await running_on(clients, running.job_id, "miner-1")
    proc = network.procs["miner"]
    proc.send_signal(signal.SIGTERM)

    async def draining() -> None:
        assert "miner_draining" in network.log("coordinator").read_text()

    await eventually(draining)
    waiting = await clients.submit(matmul_spec(n=8))
    assert await asyncio.to_thread(proc.wait, 60) == 0
    final = (await clients.watch(running.job_id))[-1]
    assert final.state == cpb.JOB_STATE_SETTLED and final.miner_id == "miner-1"
    assert await clients.balance(network.ids["miner"].address) == (final.miner_amount, 0)
    later = await get(clients, waiting.job_id)
    assert later.state == cpb.JOB_STATE_QUEUED and later.attempts == 0  # never went to the draining miner


async def test_a_result_finished_while_the_coordinator_was_down_is_delivered_and_paid_once(
    network: Network,
) -> None:
    """The coordinator is down for 20 s; meanwhile the job finishes and the
    sidecar itself is SIGKILLed and restarted. The new sidecar process finds
    the result on disk, reconnects by itself, and it is paid once."""
    network.start_wallet()
    network.start_coordinator("--lease-secs", "60", "--heartbeat-secs", "0.5")
    port = network.ports["coordinator"]
    network.start_miner("miner")
    clients = Clients(network)
    try:
        await clients.mint("client", 100_000_000)
        spec = cpb.JobSpec(
            matmul=workloads_pb2.MatmulParams(n=2048, dtype=workloads_pb2.DTYPE_FP32, seed=9, repeats=30),
            max_price=10_000_000,
        )
        job = await clients.submit(spec)
        await running_on(clients, job.job_id, "miner-1")
        down_at = time.monotonic()
        network.stop("coordinator", signal.SIGKILL)

        async def finished() -> None:
            assert '"event": "job_finished"' in network.log("miner").read_text()

        await eventually(finished, timeout=60)
        network.stop("miner", signal.SIGKILL)
        network.start_miner("miner", wait=False)  # cannot be ready: nothing to connect to
        await asyncio.sleep(max(0.0, 20 - (time.monotonic() - down_at)))
        network.start_coordinator("--lease-secs", "60", "--heartbeat-secs", "0.5", port=port)
        final = (await clients.watch(job.job_id))[-1]
        assert final.state == cpb.JOB_STATE_SETTLED, final.status_detail
        assert (final.miner_id, final.attempts) == ("miner-1", 1)
        assert await clients.balance(network.ids["miner"].address) == (final.miner_amount, 0)
        assert '"event": "results_recovered"' in network.log("miner").read_text()
    finally:
        await clients.close()


async def test_watchers_see_progress_while_the_job_runs(net: tuple[Network, Clients]) -> None:
    network, clients = net
    network.start_miner("miner")
    job = await clients.submit(long_spec())
    events = await clients.watch(job.job_id)
    running = [e for e in events if e.state == cpb.JOB_STATE_RUNNING and e.progress > 0]
    assert len(running) >= 2, [(cpb.JobState.Name(e.state), e.progress) for e in events]
    fractions = [e.progress for e in running]
    assert fractions == sorted(fractions) and 0 < fractions[0] < fractions[-1] <= 1
    assert running[-1].progress_message.startswith("multiplication ") and running[-1].progress_message.endswith(
        " of 60"
    )
    assert events[-1].state == cpb.JOB_STATE_SETTLED and events[-1].progress == 0


async def test_the_next_job_is_prefetched_and_prepared_while_one_runs(net: tuple[Network, Clients]) -> None:
    network, clients = net
    network.start_miner()  # one slot, PREFETCH=1 by default
    first = await clients.submit(long_spec())
    await running_on(clients, first.job_id, "miner-1")
    second = await clients.submit(matmul_spec(n=512))

    async def queued_at_the_miner_with_inputs_made() -> None:
        job = await get(clients, second.job_id)
        assert job.state == cpb.JOB_STATE_ASSIGNED and job.miner_id == "miner-1", job
        # Scratch: WORK_DIR, by default STATE_DIR/work.
        assert list((network.root / "miner" / "work" / "jobs").glob("*/inputs.npy")), "inputs not prepared"

    await eventually(queued_at_the_miner_with_inputs_made)
    assert (await get(clients, first.job_id)).state == cpb.JOB_STATE_RUNNING  # the slot was busy all along
    finals = [(await clients.watch(j.job_id))[-1] for j in (first, second)]
    assert [f.state for f in finals] == [cpb.JOB_STATE_SETTLED] * 2
