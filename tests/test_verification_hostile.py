"""Verification against hostile miners, with real processes: what an
attacker tried on the landed code (issue 13, part C), each now refused.

- Two colluding identities of one operator agree on garbage against an
  honest miner: the disagreement goes to a referee drawn among miners of
  other operators and payout addresses; the honest side is paid and keeps
  its standing, the colluder is refuted. With no referee in time the job is
  refunded and nobody is paid or penalised.
- 1-dimensional embed vectors (each +-1.0, unit length) are refused: the
  coordinator knows the model's dimension.
- A matmul result of the wrong size is refused before it is read.
- Four concurrent garbage results of the largest size a coordinator takes
  add less than RSS_BUDGET to its resident memory, and it keeps answering.
- Matmuls computed at a lower precision than the job's (TF32 in fp32, fp8
  on a quarter of a bf16 job's inner dimension) are refused.

Each test checks the balances before and after and that the wallet's books
are clean."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import secrets
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aitbc import crypto
from aitbc.errors import InvalidArgument
from aitbc.signed import seal
from aitbc.timeutil import ts_now
from aitbc.v1 import coordinator_pb2 as cpb
from aitbc.v1 import coordinator_pb2_grpc, signing_pb2, workloads_pb2
from aitbc.workloads.embed import MODEL_DIMENSIONS, parse_models, register_models
from aitbc.workloads.matmul import MatmulParams
from aitbc.workloads.registry import workload_of
from coordinator_svc._checks import ByteBudget, independent, operator_of
from tests.conftest import ROOT, Network, eventually, md
from tests.downgrades import downgraded
from tests.test_e2e import Clients

pytestmark = pytest.mark.timeout(300)

# What four concurrent 64 MiB garbage results may add to the coordinator's
# resident memory (its peak, from /proc). Before the budget, each check
# read its result whole and made A and B whole: about 5 GiB for four.
RSS_BUDGET = 200 * 2**20
FUNDS = 10**9
CHUNK = 2**20
OPEN_LIMITS = ("--rate-limits", "client=100000,miner=100000,admin=100000")


class HostileMiner:
    """A miner written from the proto: it answers each assignment with
    `output(spec)` (an iterator of chunks), under a receipt it signs over
    what it sent, as a careful cheater would. `start`, if given, holds each
    answer until it is set."""

    def __init__(
        self,
        net: Network,
        name: str,
        output: Callable[[cpb.JobSpec], Any],
        *,
        start: asyncio.Event | None = None,
    ) -> None:
        ident = net.ids[name]
        assert ident.key is not None
        self.net, self.ident, self.key = net, ident, ident.key
        self.miner_id = ident.principal.miner_id
        self.output = output
        self.start = start
        self.assigned: list[str] = []
        self.acks: asyncio.Queue[cpb.ResultAck] = asyncio.Queue()
        self._tasks: set[asyncio.Task[None]] = set()

    async def serve(self) -> None:
        out: asyncio.Queue[cpb.ConnectRequest] = asyncio.Queue()

        async def requests() -> AsyncIterator[cpb.ConnectRequest]:
            while True:
                yield await out.get()

        out.put_nowait(
            cpb.ConnectRequest(
                hello=cpb.MinerHello(
                    miner_id=self.miner_id,
                    public_key=self.key.public_key,
                    payout_address=self.ident.address,
                    capabilities=cpb.Capabilities(
                        workloads=["matmul", "embed"],
                        models=[cpb.ModelInfo(workload="embed", name="all-minilm-l6-v2")],
                        slots=1,
                        accel=cpb.ACCEL_KIND_CPU,
                    ),
                )
            )
        )
        async with grpc.aio.insecure_channel(self.net.coord_target) as ch:
            call = coordinator_pb2_grpc.MinerGatewayServiceStub(ch).Connect(requests(), metadata=md(self.ident))
            network_id = ""
            async for msg in call:
                kind = msg.WhichOneof("msg")
                if kind == "welcome":
                    network_id = msg.welcome.network_id
                elif kind == "assignment":
                    self.assigned.append(msg.assignment.job_id)
                    task = asyncio.create_task(self._answer(msg.assignment, network_id, out))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                elif kind == "ack":
                    self.acks.put_nowait(msg.ack)

    async def _answer(self, a: cpb.Assignment, network_id: str, out: asyncio.Queue[cpb.ConnectRequest]) -> None:
        out.put_nowait(cpb.ConnectRequest(accepted=cpb.AssignmentAccepted(lease_id=a.lease_id)))
        if self.start is not None:
            await self.start.wait()
        sha, size = hashlib.sha256(), 0
        for data in self.output(cpb.JobSpec.FromString(a.job_spec)):
            out.put_nowait(cpb.ConnectRequest(chunk=cpb.ResultChunk(lease_id=a.lease_id, offset=size, data=data)))
            sha.update(data)
            size += len(data)
            await asyncio.sleep(0)  # let the stream send it: never hold the whole output here
        body = signing_pb2.ReceiptBody(
            network_id=network_id,
            job_id=a.job_id,
            lease_id=a.lease_id,
            miner_id=self.miner_id,
            job_spec_sha256=crypto.sha256(a.job_spec),
            output_sha256=sha.digest(),
            output_size_bytes=size,
            start_time=ts_now(),
            finish_time=ts_now(),
            nonce=secrets.token_bytes(16),
            usage=signing_pb2.Usage(device="cpu"),
        )
        receipt = seal(body, crypto.RECEIPT_DOMAIN, self.key)
        out.put_nowait(cpb.ConnectRequest(result=cpb.JobResult(lease_id=a.lease_id, receipt=receipt)))


def whole(data: bytes) -> list[bytes]:
    return [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)] or [b""]


def agreed_garbage(spec: cpb.JobSpec) -> list[bytes]:
    """Unit vectors of the right shape, the same for every colluder on a job
    (seeded by the spec): well formed, and they agree with each other."""
    _, params = workload_of(spec)
    rng = np.random.default_rng(int.from_bytes(crypto.sha256(spec.SerializeToString())[:8], "little"))
    v = rng.normal(size=(len(params.texts), 384)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return whole(workloads_pb2.EmbedOutput(dimensions=384, values=v.flatten().tolist()).SerializeToString())


def one_dimensional(spec: cpb.JobSpec) -> list[bytes]:
    _, params = workload_of(spec)
    return whole(workloads_pb2.EmbedOutput(dimensions=1, values=[1.0] * len(params.texts)).SerializeToString())


def float_noise(spec: cpb.JobSpec) -> Any:
    """Finite fp32 values of C's size and scale, made a chunk at a time, so
    that the whole Freivalds check runs on them."""
    _, params = workload_of(spec)
    rng = np.random.default_rng()
    left = params.output_size
    while left:
        count = min(CHUNK, left) // 4
        yield (rng.standard_normal(count, dtype=np.float32) * np.float32(params.n**0.5 / 3)).tobytes()
        left -= count * 4


def _downgraded(spec: cpb.JobSpec, kind: str) -> list[bytes]:
    return whole(downgraded(workload_of(spec)[1], kind))


def embed_spec(*texts: str) -> cpb.JobSpec:
    return cpb.JobSpec(embed=workloads_pb2.EmbedParams(texts=list(texts)), max_price=10_000_000)


def matmul_spec(n: int, dtype: workloads_pb2.Dtype.ValueType = workloads_pb2.DTYPE_FP32) -> cpb.JobSpec:
    return cpb.JobSpec(
        matmul=workloads_pb2.MatmulParams(n=n, dtype=dtype, seed=secrets.randbits(32)), max_price=100_000_000
    )


async def get(clients: Clients, job_id: str) -> cpb.Job:
    resp = await clients.coord.GetJob(cpb.GetJobRequest(job_id=job_id), metadata=md(clients.net.ids["client"]))
    return resp.job


async def ended(clients: Clients, job_id: str, timeout: float = 120) -> cpb.Job:
    async def check() -> cpb.Job:
        job = await get(clients, job_id)
        assert job.state in (cpb.JOB_STATE_SETTLED, cpb.JOB_STATE_FAILED, cpb.JOB_STATE_CANCELLED), job.state
        return job

    return await eventually(check, timeout=timeout)


async def _requeued(clients: Clients, job_id: str) -> None:
    job = await get(clients, job_id)
    assert job.state == cpb.JOB_STATE_QUEUED and job.runs, job.state


def standing(net: Network, miner_id: str) -> tuple[int, int]:
    """(accepted, refused) of a miner, from the coordinator's store."""
    with sqlite3.connect(f"file:{net.root / 'coordinator.sqlite'}?mode=ro", uri=True) as db:
        row = db.execute("SELECT accepted, refused FROM miners WHERE miner_id = ?", (miner_id,)).fetchone()
    return (int(row[0]), int(row[1])) if row else (0, 0)


def books_are_clean(net: Network) -> None:
    net.stop_all()
    check = subprocess.run(
        [sys.executable, "-m", "wallet_svc", "check", "--db", str(net.root / "wallet.sqlite"),
         "--treasury-address", net.treasury],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert check.returncode == 0 and "clean" in check.stdout, check.stdout + check.stderr


def memory(net: Network, key: str) -> int:
    """VmRSS (now) or VmHWM (peak) of the coordinator, in bytes."""
    for line in Path(f"/proc/{net.procs['coordinator'].pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {key} in /proc status")


async def serving(tasks: list[asyncio.Task[None]]) -> None:
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


@pytest.fixture
async def opened(network: Network) -> AsyncIterator[Callable[..., Clients]]:
    """Start the wallet and a coordinator with the given flags; clients to both."""
    made: list[Clients] = []

    def start(*flags: str) -> Clients:
        network.start_wallet()
        network.start_coordinator(*flags, *OPEN_LIMITS)
        made.append(Clients(network))
        return made[-1]

    try:
        yield start
    finally:
        for c in made:
            await c.close()


async def test_colluders_are_refereed_and_the_honest_miner_is_paid(
    network: Network, opened: Callable[..., Clients]
) -> None:
    ring = [network.add_identity(f"mallory/gpu-{i}", "miner", miner_id=f"mallory-{i}") for i in (1, 2)]
    clients = opened("--max-attempts", "2")
    await clients.mint("client", FUNDS)
    network.start_miner("miner")
    job = await clients.submit(embed_spec("a gpu marketplace", "verified work"))

    async def one_pending() -> None:
        j = await get(clients, job.job_id)
        assert len(j.runs) == 1 and j.state == cpb.JOB_STATE_QUEUED, j

    await eventually(one_pending, timeout=60)
    # Both colluders connect; the dispatcher gives the second run to one of
    # them. On the landed code the other then took the third run, agreed
    # with its partner, and the pair was paid while the honest miner was
    # refused. Now the other shares the first's operator: it may not
    # referee, and the job waits for a miner of another operator.
    colluders = [HostileMiner(network, i.principal.name, agreed_garbage) for i in ring]
    tasks = [asyncio.create_task(c.serve()) for c in colluders]
    try:

        async def waiting_for_referee() -> cpb.Job:
            j = await get(clients, job.job_id)
            assert len(j.runs) == 2 and "referee" in j.status_detail, j
            return j

        await eventually(waiting_for_referee, timeout=60)
        assert sorted(len(c.assigned) for c in colluders) == [0, 1]  # the idle partner was passed over
        dissenter = next(c for c in colluders if c.assigned)
        network.start_miner("miner2")
        final = (await clients.watch(job.job_id))[-1]
        ack = await asyncio.wait_for(dissenter.acks.get(), 5)
        assert ack.verdict == cpb.VERDICT_PENDING
        ack = await asyncio.wait_for(dissenter.acks.get(), 30)
        assert ack.verdict == cpb.VERDICT_DISAGREED and ack.miner_amount == 0, ack
    finally:
        await serving(tasks)
    assert final.state == cpb.JOB_STATE_SETTLED, final.status_detail
    verdicts = {r.miner_id: cpb.Verdict.Name(r.verdict) for r in final.runs}
    assert verdicts == {"miner-1": "VERDICT_ACCEPTED", dissenter.miner_id: "VERDICT_DISAGREED",
                        "miner-2": "VERDICT_ACCEPTED"}, verdicts  # fmt: skip
    # The honest minority (one identity against two) keeps its standing and
    # gains; the colluder that ran is refuted once.
    assert standing(network, "miner-1") == (1, 0) and standing(network, "miner-2") == (1, 0)
    assert standing(network, dissenter.miner_id) == (0, 1)
    pay = final.miner_amount // 2
    assert await clients.balance(network.ids["miner"].address) == (pay, 0)
    assert await clients.balance(network.ids["miner2"].address) == (pay, 0)
    for ident in ring:
        assert await clients.balance(ident.address) == (0, 0)
    assert await clients.balance(network.ids["client"].address) == (FUNDS - final.price, 0)
    books_are_clean(network)


async def test_without_a_referee_in_time_the_job_is_refunded_and_nobody_judged(
    network: Network, opened: Callable[..., Clients]
) -> None:
    ring = [network.add_identity(f"mallory/gpu-{i}", "miner", miner_id=f"mallory-{i}") for i in (1, 2)]
    clients = opened("--referee-wait-secs", "3")
    await clients.mint("client", FUNDS)
    network.start_miner("miner")
    job = await clients.submit(embed_spec("tokens per second"))

    async def one_pending() -> None:
        j = await get(clients, job.job_id)
        assert len(j.runs) == 1 and j.state == cpb.JOB_STATE_QUEUED, j

    await eventually(one_pending, timeout=60)
    colluders = [HostileMiner(network, i.principal.name, agreed_garbage) for i in ring]
    tasks = [asyncio.create_task(c.serve()) for c in colluders]
    try:
        final = await ended(clients, job.job_id, timeout=60)
    finally:
        await serving(tasks)
    assert final.state == cpb.JOB_STATE_FAILED and "no independent referee" in final.status_detail, final
    assert [cpb.Verdict.Name(r.verdict) for r in final.runs] == ["VERDICT_PENDING"] * 2
    dissenter = next(c for c in colluders if c.assigned)
    for miner_id in ("miner-1", dissenter.miner_id):
        assert standing(network, miner_id) == (0, 0), miner_id  # nobody penalised (or credited)
    for who in ("miner", *(i.principal.name for i in ring)):
        assert await clients.balance(network.ids[who].address) == (0, 0)
    assert await clients.balance(network.ids["client"].address) == (FUNDS, 0)
    books_are_clean(network)


async def test_malformed_outputs_are_refused_and_wrong_sizes_unread(
    network: Network, opened: Callable[..., Clients]
) -> None:
    clients = opened("--max-attempts", "1")
    await clients.mint("client", FUNDS)
    n = 64
    size = MatmulParams(n=n, dtype="fp32", seed=0).output_size
    cases: list[tuple[str, cpb.JobSpec, Callable[[cpb.JobSpec], Any], str]] = [
        # Unit length, finite, and the right count: only the model's
        # dimension (384) says it is not an embedding.
        ("cheater", embed_spec("a", "b", "c"), one_dimensional, "384 dimensions"),
        # A C one row short, and one 4 bytes long: the size alone decides.
        ("cheater2", matmul_spec(n), lambda s: whole(bytes(size - 4 * n)), "refused unread"),
        ("miner3", matmul_spec(n), lambda s: whole(bytes(size + 4)), "refused unread"),
    ]
    for who, spec, output, expect in cases:
        hostile = HostileMiner(network, who, output)
        task = asyncio.create_task(hostile.serve())
        try:
            job = await clients.submit(spec)
            ack = await asyncio.wait_for(hostile.acks.get(), 60)
        finally:
            await serving([task])
        assert ack.verdict == cpb.VERDICT_BAD_OUTPUT and expect in ack.detail, ack
        if spec.HasField("embed"):  # it needs two runs and waits for another miner: cancel it
            await eventually(partial(_requeued, clients, job.job_id))
            cancel = cpb.CancelJobRequest(job_id=job.job_id)
            await clients.coord.CancelJob(cancel, metadata=md(network.ids["client"]))
        final = await ended(clients, job.job_id)
        assert final.miner_amount == 0, final
        assert await clients.balance(network.ids[who].address) == (0, 0)
    assert await clients.balance(network.ids["client"].address) == (FUNDS, 0)
    books_are_clean(network)


async def test_precision_downgrades_are_refused(network: Network, opened: Callable[..., Clients]) -> None:
    clients = opened("--max-attempts", "1")
    await clients.mint("client", FUNDS)
    for who, dtype, kind in [
        ("cheater", workloads_pb2.DTYPE_FP32, "tf32"),
        ("cheater2", workloads_pb2.DTYPE_BF16, "fp8_quarter"),
    ]:
        hostile = HostileMiner(network, who, partial(_downgraded, kind=kind))
        task = asyncio.create_task(hostile.serve())
        try:
            job = await clients.submit(matmul_spec(256, dtype))
            ack = await asyncio.wait_for(hostile.acks.get(), 60)
        finally:
            await serving([task])
        assert ack.verdict == cpb.VERDICT_BAD_OUTPUT and "arithmetic" in ack.detail, ack
        final = await ended(clients, job.job_id)
        assert final.state == cpb.JOB_STATE_FAILED and final.miner_amount == 0
        assert await clients.balance(network.ids[who].address) == (0, 0)
    assert await clients.balance(network.ids["client"].address) == (FUNDS, 0)
    books_are_clean(network)


async def test_four_garbage_results_of_the_largest_size_stay_within_the_memory_budget(
    network: Network, opened: Callable[..., Clients]
) -> None:
    # The default MAX_RESULT_BYTES (64 MiB) admits n = 4096 in fp32.
    names = [network.add_identity(f"flood-{i}", "miner", miner_id=f"flood-{i}").principal.name for i in range(4)]
    clients = opened("--max-attempts", "1")
    await clients.mint("client", FUNDS)
    start = asyncio.Event()
    hostile = [HostileMiner(network, name, float_noise, start=start) for name in names]
    tasks = [asyncio.create_task(h.serve()) for h in hostile]
    health = grpc.aio.insecure_channel(network.coord_target)
    try:
        jobs = [await clients.submit(matmul_spec(4096)) for _ in hostile]

        async def all_assigned() -> None:
            assert all(h.assigned for h in hostile)

        await eventually(all_assigned, timeout=30)
        before = memory(network, "VmRSS")
        _reset_peak(network)
        start.set()
        # While the four are uploaded and checked, the coordinator answers:
        # health, and GetJob showing jobs mid-check.
        seen: set[int] = set()
        answers = 0
        while True:
            states = [(await get(clients, j.job_id)).state for j in jobs]
            seen.update(states)
            resp = await health_pb2_grpc.HealthStub(health).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
            answers += 1
            if all(s == cpb.JOB_STATE_FAILED for s in states):
                break
            await asyncio.sleep(0.05)
        peak = memory(network, "VmHWM")
        acks = [await asyncio.wait_for(h.acks.get(), 10) for h in hostile]
    finally:
        await health.close()
        await serving(tasks)
    assert cpb.JOB_STATE_VERIFYING in seen and answers > 1, (seen, answers)
    assert all(a.verdict == cpb.VERDICT_BAD_OUTPUT and "Freivalds" in a.detail for a in acks), acks
    grew = peak - before
    print(f"four 64 MiB garbage results: the coordinator's RSS grew by {grew / 2**20:.0f} MiB at its peak")
    assert grew < RSS_BUDGET, f"{grew / 2**20:.0f} MiB"
    for name in names:
        assert await clients.balance(network.ids[name].address) == (0, 0)
    assert await clients.balance(network.ids["client"].address) == (FUNDS, 0)
    books_are_clean(network)


def _reset_peak(net: Network) -> None:
    """Reset VmHWM to the current RSS (Linux clear_refs "5"), so the peak
    read later is this flood's; where that is not allowed, VmHWM since start
    only overstates the growth."""
    with contextlib.suppress(OSError):
        Path(f"/proc/{net.procs['coordinator'].pid}/clear_refs").write_text("5")


async def test_a_byte_budget_admits_in_order_and_never_overcommits() -> None:
    budget = ByteBudget(100)
    held: list[int] = []
    order: list[str] = []

    async def take(name: str, amount: int, hold: float) -> None:
        got = await budget.acquire(amount)
        order.append(name)
        held.append(got)
        assert sum(held) <= 100
        await asyncio.sleep(hold)
        held.remove(got)
        budget.release(got)

    # "big" waits behind "a"; "small" arrives after "big" and must not jump it.
    a = asyncio.create_task(take("a", 60, 0.05))
    await asyncio.sleep(0)
    big = asyncio.create_task(take("big", 80, 0.01))
    await asyncio.sleep(0)
    small = asyncio.create_task(take("small", 10, 0.01))
    huge = asyncio.create_task(take("huge", 10**6, 0.01))  # more than all: runs alone
    await asyncio.gather(a, big, small, huge)
    assert order == ["a", "big", "small", "huge"] and budget.free == 100
    # A waiter cancelled in the queue takes nothing with it.
    first = await budget.acquire(100)
    waiter = asyncio.create_task(budget.acquire(50))
    await asyncio.sleep(0)
    waiter.cancel()
    budget.release(first)
    assert budget.free == 100


def test_outputs_are_checked_against_the_spec_and_the_model() -> None:
    embed, params = workload_of(embed_spec("a", "b"))
    v = np.eye(2, 384, dtype=np.float32)  # unit vectors
    assert embed.check(params, workloads_pb2.EmbedOutput(dimensions=384, values=v.flatten().tolist())
                       .SerializeToString()).ok  # fmt: skip
    for dims in (1, 383, 385):
        w = np.eye(2, dims, dtype=np.float32)
        out = workloads_pb2.EmbedOutput(dimensions=dims, values=w.flatten().tolist()).SerializeToString()
        assert not embed.check(params, out).ok, dims
    # A model whose dimension the coordinator does not know is refused at
    # submit; EMBED_MODELS teaches it one.
    other = cpb.JobSpec(embed=workloads_pb2.EmbedParams(model="e5-test-model", texts=["a"]))
    with pytest.raises(InvalidArgument) as err:
        workload_of(other)
    assert err.value.reason == "UNKNOWN_MODEL" and err.value.field == "spec.embed.model"
    register_models(parse_models("e5-test-model=768"))
    try:
        _, p768 = workload_of(other)
        assert embed.max_output_size(p768) == 32 + 768 * 4
    finally:
        MODEL_DIMENSIONS.pop("e5-test-model")

    llm, lp = workload_of(cpb.JobSpec(llm_gen=workloads_pb2.LlmGenParams(model="m", prompt="hi", max_new_tokens=3)))
    good = workloads_pb2.LlmGenOutput(text="abc", token_ids=[1, 2, 3], prompt_tokens=1)
    assert llm.check(lp, good.SerializeToString()).ok
    for bad in (
        workloads_pb2.LlmGenOutput(text="abcd", token_ids=[1, 2, 3, 4], prompt_tokens=1),  # > max_new_tokens
        workloads_pb2.LlmGenOutput(text="abc", token_ids=[1, 2, 3], prompt_tokens=11),  # > 2 bytes + 8
        workloads_pb2.LlmGenOutput(text="x" * 257, token_ids=[1], prompt_tokens=1),  # > 256 bytes a token
    ):
        assert not llm.check(lp, bad.SerializeToString()).ok, bad


def test_referees_are_independent_of_every_run() -> None:
    @dataclass
    class Party:
        payout_address: str
        operator: str

    runs = [Party("ait_a", "alice"), Party("ait_b", "")]
    assert operator_of("alice/gpu-3") == "alice" and operator_of("gpu-3") == "" and operator_of("/x") == ""
    assert not independent(Party("ait_a", ""), runs)  # the same payout address
    assert not independent(Party("ait_c", "alice"), runs)  # the same operator
    assert independent(Party("ait_c", ""), runs)  # unknown operators never match each other
    assert independent(Party("ait_c", "bob"), runs)
