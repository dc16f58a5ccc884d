"""The load of `python -m bench e2e`: lean simulated miners and job
submitters, run in worker processes that bench/e2e.py drives over a pipe.

A lean miner is one gRPC Connect stream on a connection of its own: a hello
with its key and matmul capability, heartbeats at the interval the welcome
asks for, and for each assignment an accept, the correct product of the tiny
matmul (aitbc.workloads.matmul, as the coordinator regenerates it) and a
receipt signed with its Ed25519 key, as a real sidecar sends them. No torch,
no files, no subprocess: the point is to load the coordinator, not the miner.

Times are time.monotonic(), which on Linux is one clock for every process
on the machine, so a SubmitJob return seen in one worker and the assignment
seen by a miner in another are comparable.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import grpc
import nacl.signing

from aitbc import crypto
from aitbc.timeutil import ts_now
from aitbc.v1 import coordinator_pb2 as cpb
from aitbc.v1 import coordinator_pb2_grpc, signing_pb2, workloads_pb2
from aitbc.workloads.matmul import MatmulParams, encode_output, make_inputs

# One TCP connection per stream, as separate miner hosts would have: gRPC
# otherwise shares one connection among channels to the same target.
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]
TRANSIENT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED}
# Open-loop submissions in flight at once, per worker: past it the pacer
# waits, and says so (a coordinator that slow is past saturation anyway).
PACED_IN_FLIGHT = 512


@dataclass(frozen=True)
class MinerSpec:
    miner_id: str
    token: str
    seed: bytes
    payout: str
    target: str


@dataclass
class Shared:
    """Counters every worker and the orchestrator see (multiprocessing
    arrays, one slot per worker, each written only by its worker). Jobs
    whose submission began less results acknowledged as accepted is the
    load in flight."""

    submitted: Any
    accepted: Any
    refused: Any
    # Heartbeats sent.
    beats: Any

    def outstanding(self) -> int:
        return sum(self.submitted) - sum(self.accepted)


def job_spec(n: int) -> cpb.JobSpec:
    # A fresh seed per job: every output is a blob of its own, as in use.
    return cpb.JobSpec(
        matmul=workloads_pb2.MatmulParams(n=n, dtype=workloads_pb2.DTYPE_FP32, seed=random.getrandbits(62)),
        max_price=100_000,
    )


def answer(spec_bytes: bytes) -> bytes:
    """The correct output of an assignment's matmul."""
    m = cpb.JobSpec.FromString(spec_bytes).matmul
    params = MatmulParams(n=m.n, dtype="fp32", seed=m.seed)
    a, b = make_inputs(params)
    return encode_output(params, a @ b)


class Worker:
    """One process's share of the miners and submitters."""

    def __init__(self, index: int, shared: Shared) -> None:
        self.index = index
        self.shared = shared
        self.miners: list[LeanMiner] = []
        # job id -> when its first assignment reached a miner here.
        self.assigned: dict[str, float] = {}
        # When each accepted verdict arrived.
        self.acks: list[float] = []
        self.refusals: list[str] = []
        self.submit_errors: dict[str, int] = {}

    def count_accept(self) -> None:
        self.shared.accepted[self.index] += 1
        self.acks.append(time.monotonic())

    def count_refusal(self, detail: str) -> None:
        self.shared.refused[self.index] += 1
        if len(self.refusals) < 5:
            self.refusals.append(detail)

    # -- miners ------------------------------------------------------------

    async def connect(self, specs: list[MinerSpec], wait: float) -> dict[str, Any]:
        """Open the miners' streams; those not welcomed within `wait` s are
        closed again and take no part."""
        start = time.monotonic()
        deadline = start + wait
        # Hellos in flight at once: thousands at once only queue up in the
        # kernel's accept backlog and time out there.
        gate = asyncio.Semaphore(64)
        miners = [LeanMiner(s, self) for s in specs]

        async def one(m: LeanMiner) -> None:
            async with gate:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                m.start()
                # Refused or cut off: counted below, not raised.
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.shield(m.welcomed), left)

        await asyncio.gather(*(one(m) for m in miners))
        ok = [m for m in miners if m.welcomed_at]
        await asyncio.gather(*(m.close() for m in miners if not m.welcomed_at))
        self.miners += ok
        errors = sorted({m.error for m in miners if m.error})[:5]
        last = max((m.welcomed_at for m in ok), default=start)
        return {"welcomed": len(ok), "seconds": last - start, "errors": errors}

    async def disconnect(self) -> None:
        await asyncio.gather(*(m.close() for m in self.miners))
        self.miners = []

    # -- submitters --------------------------------------------------------

    async def _submit(self, stub: Any, md: Any, n: int, out: dict[str, float]) -> bool:
        spec = job_spec(n)
        request_id = secrets.token_hex(8)
        for _ in range(50):
            try:
                resp = await stub.SubmitJob(
                    cpb.SubmitJobRequest(spec=spec, request_id=request_id), metadata=md, timeout=60
                )
            except grpc.aio.AioRpcError as err:
                key = err.code().name
                self.submit_errors[key] = self.submit_errors.get(key, 0) + 1
                if err.code() not in TRANSIENT:
                    return False
                await asyncio.sleep(0.05)
                continue
            out[resp.job.job_id] = time.monotonic()
            return True
        return False

    def _channels(self, targets: list[str], count: int) -> list[grpc.aio.Channel]:
        return [grpc.aio.insecure_channel(targets[i % len(targets)], options=OWN_CONNECTION) for i in range(count)]

    async def closed_loop(
        self, targets: list[str], token: str, submitters: int, window: int, seconds: float, n: int
    ) -> dict[str, float]:
        """`submitters` clients submitting back to back while fewer than
        `window` jobs (all workers together) await their verdict."""
        out: dict[str, float] = {}
        if not submitters:
            await asyncio.sleep(seconds)
            return out
        md = (("authorization", f"Bearer {token}"),)
        channels = self._channels(targets, submitters)
        stop = time.monotonic() + seconds
        shared, me = self.shared, self.index
        gate = Gate(shared, me, window)

        async def client(ch: grpc.aio.Channel) -> None:
            stub = coordinator_pb2_grpc.CoordinatorServiceStub(ch)
            while await gate.enter(stop):
                if not await self._submit(stub, md, n, out):
                    shared.submitted[me] -= 1

        try:
            await asyncio.gather(*(client(ch) for ch in channels))
        finally:
            for ch in channels:
                await ch.close()
        return out

    async def one_at_a_time(self, targets: list[str], token: str, seconds: float, n: int) -> dict[str, float]:
        """Light load: one job, wait for its verdict, the next."""
        out: dict[str, float] = {}
        md = (("authorization", f"Bearer {token}"),)
        (ch,) = self._channels(targets, 1)
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(ch)
        shared, me = self.shared, self.index
        stop = time.monotonic() + seconds
        try:
            while time.monotonic() < stop:
                shared.submitted[me] += 1
                if not await self._submit(stub, md, n, out):
                    shared.submitted[me] -= 1
                    continue
                deadline = time.monotonic() + 30
                # Shared memory another process writes: nothing to await but time.
                while shared.outstanding() > 0 and time.monotonic() < deadline:  # noqa: ASYNC110
                    await asyncio.sleep(0.0005)
                # Apart by a little more than the work: no two jobs meet.
                await asyncio.sleep(0.01)
        finally:
            await ch.close()
        return out

    async def paced(
        self, targets: list[str], token: str, rate: float, seconds: float, n: int, connections: int
    ) -> dict[str, Any]:
        """Open loop: a submission every 1/rate s whatever the answers do."""
        out: dict[str, float] = {}
        md = (("authorization", f"Bearer {token}"),)
        channels = self._channels(targets, connections)
        stubs = [coordinator_pb2_grpc.CoordinatorServiceStub(ch) for ch in channels]
        shared, me = self.shared, self.index
        pending: set[asyncio.Task[bool]] = set()
        start = time.monotonic()
        count = int(rate * seconds)
        late = 0.0
        capped = 0
        try:
            for k in range(count):
                due = start + k / rate
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                else:
                    late = max(late, -wait)
                while len(pending) >= PACED_IN_FLIGHT:
                    capped += 1
                    await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                shared.submitted[me] += 1
                task = asyncio.create_task(self._submit(stubs[k % len(stubs)], md, n, out))
                pending.add(task)
                task.add_done_callback(pending.discard)
                task.add_done_callback(lambda t: None if t.result() else _undo(shared.submitted, me))
            if pending:
                await asyncio.wait(pending)
        finally:
            for ch in channels:
                await ch.close()
        return {"submitted": out, "late_max": late, "capped": capped, "seconds": time.monotonic() - start}

    async def burst(self, targets: list[str], token: str, count: int, concurrency: int, n: int) -> dict[str, float]:
        """`count` jobs as fast as `concurrency` callers get them in."""
        out: dict[str, float] = {}
        md = (("authorization", f"Bearer {token}"),)
        channels = self._channels(targets, min(concurrency, 8))
        stubs = [coordinator_pb2_grpc.CoordinatorServiceStub(ch) for ch in channels]
        left = [count]
        shared, me = self.shared, self.index

        async def caller(i: int) -> None:
            while left[0] > 0:
                left[0] -= 1
                shared.submitted[me] += 1
                if not await self._submit(stubs[i % len(stubs)], md, n, out):
                    shared.submitted[me] -= 1

        try:
            await asyncio.gather(*(caller(i) for i in range(concurrency)))
        finally:
            for ch in channels:
                await ch.close()
        return out

    def collect(self) -> dict[str, Any]:
        got = {
            "assigned": self.assigned,
            "acks": self.acks,
            "refusals": self.refusals,
            "submit_errors": self.submit_errors,
            "streams_ended": sorted({m.error for m in self.miners if m.error})[:5],
        }
        self.assigned, self.acks, self.refusals, self.submit_errors = {}, [], [], {}
        return got


class Gate:
    """Admits a submission while fewer than `window` jobs, counted over all
    workers in shared memory, await their verdict. Nothing can wake an
    asyncio task when another process writes that memory, so one task per
    worker looks every millisecond, and only while a submitter waits."""

    def __init__(self, shared: Shared, me: int, window: int) -> None:
        self.shared, self.me, self.window = shared, me, window
        self.waiters: deque[asyncio.Future[None]] = deque()
        self.poller: asyncio.Task[None] | None = None

    async def enter(self, stop: float) -> bool:
        """True once admitted (counted as submitted); False at `stop`."""
        left = stop - time.monotonic()
        if left <= 0:
            return False
        if not self.waiters and self.shared.outstanding() < self.window:
            self.shared.submitted[self.me] += 1
            return True
        fut = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        if self.poller is None or self.poller.done():
            self.poller = asyncio.create_task(self._poll())
        try:
            await asyncio.wait_for(fut, left)
        except TimeoutError:
            if fut.done() and not fut.cancelled():  # admitted as time ran out
                self.shared.submitted[self.me] -= 1
            return False
        if time.monotonic() >= stop:
            self.shared.submitted[self.me] -= 1
            return False
        return True

    async def _poll(self) -> None:
        while self.waiters:
            room = self.window - self.shared.outstanding()
            while room > 0 and self.waiters:
                fut = self.waiters.popleft()
                if not fut.done():  # its wait_for gave up meanwhile
                    self.shared.submitted[self.me] += 1
                    fut.set_result(None)
                    room -= 1
            if self.waiters:
                await asyncio.sleep(0.001)


def _undo(arr: Any, i: int) -> None:
    arr[i] -= 1


@dataclass
class LeanMiner:
    spec: MinerSpec
    worker: Worker
    welcomed: asyncio.Future[None] = field(init=False)
    error: str = ""
    welcomed_at: float = 0.0
    network_id: str = ""
    busy: int = 0
    task: asyncio.Task[None] | None = None

    def __post_init__(self) -> None:
        self.welcomed = asyncio.get_running_loop().create_future()
        self.key = nacl.signing.SigningKey(self.spec.seed)
        self.public_key = bytes(self.key.verify_key)
        self.lock = asyncio.Lock()

    def start(self) -> None:
        self.task = asyncio.create_task(self.run())

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task

    async def _send(self, call: Any, req: cpb.ConnectRequest) -> None:
        async with self.lock:
            await call.write(req)

    async def run(self) -> None:
        channel = grpc.aio.insecure_channel(self.spec.target, options=OWN_CONNECTION)
        beat: asyncio.Task[None] | None = None
        try:
            call = coordinator_pb2_grpc.MinerGatewayServiceStub(channel).Connect(
                metadata=(("authorization", f"Bearer {self.spec.token}"),)
            )
            hello = cpb.MinerHello(
                miner_id=self.spec.miner_id, public_key=self.public_key, payout_address=self.spec.payout,
                capabilities=cpb.Capabilities(workloads=["matmul"], slots=1, accel=cpb.ACCEL_KIND_CPU),
                version="0.1.0",
            )  # fmt: skip
            await self._send(call, cpb.ConnectRequest(hello=hello))
            while True:
                msg = await call.read()
                if msg is grpc.aio.EOF:
                    self.error = self.error or "stream ended by the coordinator"
                    break
                kind = msg.WhichOneof("msg")
                if kind == "assignment":
                    self.worker.assigned.setdefault(msg.assignment.job_id, time.monotonic())
                    await self._run(call, msg.assignment)
                elif kind == "ack":
                    if msg.ack.verdict == cpb.VERDICT_ACCEPTED:
                        self.worker.count_accept()
                    else:
                        self.worker.count_refusal(f"{cpb.Verdict.Name(msg.ack.verdict)}: {msg.ack.detail}")
                elif kind == "welcome":
                    self.network_id = msg.welcome.network_id
                    interval = msg.welcome.heartbeat_interval.ToNanoseconds() / 1e9 or 5.0
                    beat = asyncio.create_task(self._beat(call, interval))
                    self.welcomed_at = time.monotonic()
                    self.welcomed.set_result(None)
        except asyncio.CancelledError:
            raise
        except grpc.aio.AioRpcError as err:
            self.error = f"{err.code().name}: {err.details()}"
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            if not self.welcomed.done():
                self.welcomed.set_exception(RuntimeError(self.error or "closed"))
                self.welcomed.exception()  # retrieved: no "never retrieved" warning
            if beat is not None:
                beat.cancel()
            await channel.close()

    async def _beat(self, call: Any, interval: float) -> None:
        # A random phase: thousands of miners do not beat in step.
        await asyncio.sleep(random.uniform(0, interval))
        while True:
            await self._send(call, cpb.ConnectRequest(heartbeat=cpb.MinerHeartbeat(free_slots=1 - self.busy)))
            self.worker.shared.beats[self.worker.index] += 1
            await asyncio.sleep(interval)

    async def _run(self, call: Any, a: cpb.Assignment) -> None:
        self.busy = 1
        await self._send(call, cpb.ConnectRequest(accepted=cpb.AssignmentAccepted(lease_id=a.lease_id)))
        data = answer(a.job_spec)
        body = signing_pb2.ReceiptBody(
            network_id=self.network_id, job_id=a.job_id, lease_id=a.lease_id, miner_id=self.spec.miner_id,
            job_spec_sha256=crypto.sha256(a.job_spec), output_sha256=crypto.sha256(data),
            output_size_bytes=len(data), start_time=ts_now(), finish_time=ts_now(), nonce=secrets.token_bytes(16),
            usage=signing_pb2.Usage(device="cpu", work_items=1),
        ).SerializeToString(deterministic=True)  # fmt: skip
        signature = self.key.sign(crypto.signing_input(crypto.RECEIPT_DOMAIN, body)).signature
        receipt = signing_pb2.Signed(body=body, signature=signature, public_key=self.public_key)
        await self._send(call, cpb.ConnectRequest(chunk=cpb.ResultChunk(lease_id=a.lease_id, offset=0, data=data)))
        await self._send(call, cpb.ConnectRequest(result=cpb.JobResult(lease_id=a.lease_id, receipt=receipt)))
        self.busy = 0


def worker_main(index: int, conn: Connection, shared: Shared) -> None:
    """A worker process: commands in over the pipe, one at a time, each
    answered with a dict."""
    asyncio.run(_serve(index, conn, shared))


async def _serve(index: int, conn: Connection, shared: Shared) -> None:
    worker = Worker(index, shared)
    loop = asyncio.get_running_loop()
    commands: dict[str, Callable[..., Any]] = {
        "connect": worker.connect,
        "closed_loop": worker.closed_loop,
        "one_at_a_time": worker.one_at_a_time,
        "paced": worker.paced,
        "burst": worker.burst,
        "disconnect": worker.disconnect,
    }
    while True:
        name, kwargs = await loop.run_in_executor(None, conn.recv)
        if name == "exit":
            await worker.disconnect()
            conn.send({})
            return
        if name == "collect":
            conn.send(worker.collect())
            continue
        try:
            result = await commands[name](**kwargs)
        except Exception as exc:  # told to the orchestrator, which fails the run
            conn.send({"error": f"{name}: {type(exc).__name__}: {exc}"})
            continue
        conn.send(result if isinstance(result, dict) else {})
