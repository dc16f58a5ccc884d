"""The bare-bones coordinator `python -m bench e2e` measures AITBC's against:
the smallest push -> verify -> settle loop that speaks the same gRPC subset
(CoordinatorService.SubmitJob, GetJob, ListJobs; MinerGatewayService.Connect)
to the same load generator and settles through the same wallet process. Only
the benchmark runs it; nothing in the product imports it.

What it keeps of the real work: a bearer token looked up per call, the
client's hold placed in the wallet before SubmitJob returns, each job pushed
to a free miner over its stream, the receipt's Ed25519 signature and bindings
checked (aitbc.signed.open_signed) and the output checked with the product's
own Freivalds code, a settlement signed with the coordinator's key and paid
through the wallet's batched SettleHolds. What it drops: any store (jobs live
in a dict and die with the process), leases and their expiry, retries,
reputation, redundancy, watches, metrics, logs, retention.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, cast

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from aitbc import crypto
from aitbc.auth import Principal, TokenTable
from aitbc.crypto import load_or_create_key
from aitbc.errors import InvalidArgument
from aitbc.server import write_ready_file
from aitbc.signed import open_signed, seal
from aitbc.timeutil import duration, ts_now
from aitbc.v1 import coordinator_pb2 as cpb
from aitbc.v1 import coordinator_pb2_grpc, signing_pb2, wallet_pb2, wallet_pb2_grpc
from aitbc.workloads.matmul import freivalds
from aitbc.workloads.registry import workload_of

PRICE_BASE, FEE_BPS = 1000, 500  # the coordinator's defaults for matmul
SETTLE_BATCH = 1000  # SettleHolds takes at most this many


def _ts(epoch: float) -> Timestamp:
    t = Timestamp()
    t.FromNanoseconds(int(epoch * 1e9))
    return t


async def abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    await context.abort(code, message)
    raise AssertionError("abort returned")


@dataclass
class Job:
    job_id: str
    spec: cpb.JobSpec
    spec_bytes: bytes
    client_address: str
    price: int
    state: int = cpb.JOB_STATE_QUEUED
    miner_id: str = ""
    lease_id: str = ""
    create_time: float = field(default_factory=time.time)
    update_time: float = field(default_factory=time.time)

    def pb(self) -> cpb.Job:
        fee = self.price * FEE_BPS // 10_000
        settled = self.state in (cpb.JOB_STATE_SETTLING, cpb.JOB_STATE_SETTLED)
        return cpb.Job(
            job_id=self.job_id, state=self.state, spec=self.spec, client_address=self.client_address,  # type: ignore[arg-type]
            miner_id=self.miner_id, price=self.price, miner_amount=self.price - fee if settled else 0,
            fee_amount=fee if settled else 0, create_time=_ts(self.create_time), update_time=_ts(self.update_time),
        )  # fmt: skip

    def move(self, state: int) -> None:
        self.state, self.update_time = state, time.time()


@dataclass
class Miner:
    miner_id: str
    key: bytes
    payout: str
    outbox: asyncio.Queue[cpb.ConnectResponse | None] = field(default_factory=asyncio.Queue)
    job: Job | None = None
    output: bytearray = field(default_factory=bytearray)
    gone: bool = False


# The generated servicers answer UNIMPLEMENTED for what is not overridden.
class Baseline(coordinator_pb2_grpc.CoordinatorServiceServicer, coordinator_pb2_grpc.MinerGatewayServiceServicer):
    def __init__(self, args: argparse.Namespace, wallet_token: str) -> None:
        self.tokens = TokenTable.load(Path(args.tokens_file))
        self.key = load_or_create_key(Path(args.key_file))
        self.network_id = args.network_id
        self.heartbeat = args.heartbeat_secs
        channel = grpc.aio.insecure_channel(args.wallet_target)
        self.wallet = wallet_pb2_grpc.WalletServiceStub(channel)
        self.wallet_md = (("authorization", f"Bearer {wallet_token}"),)
        self.jobs: dict[str, Job] = {}
        self.order: list[str] = []  # job ids, oldest first
        self.requests: dict[tuple[str, str], str] = {}
        self.queue: deque[Job] = deque()
        self.free: deque[Miner] = deque()
        self.keys: dict[str, bytes] = {}
        self.to_settle: list[tuple[Job, signing_pb2.Signed]] = []
        self.settle_due = asyncio.Event()

    async def caller(self, context: grpc.aio.ServicerContext, role: str) -> Principal:
        for k, v in context.invocation_metadata() or ():
            if k == "authorization" and isinstance(v, str) and v.startswith("Bearer "):
                p = self.tokens.lookup(v[7:])
                if p is not None and p.role == role and not p.expired:
                    return p
        await abort(context, grpc.StatusCode.UNAUTHENTICATED, "no valid token for this role")

    # -- clients -------------------------------------------------------------

    async def SubmitJob(self, request: cpb.SubmitJobRequest, context: grpc.aio.ServicerContext) -> Any:
        client = await self.caller(context, "client")
        prior = self.requests.get((client.name, request.request_id))
        if prior is not None:
            return cpb.SubmitJobResponse(job=self.jobs[prior].pb())
        try:
            workload, params = workload_of(request.spec)
        except InvalidArgument as exc:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, exc.message)
        price = PRICE_BASE + workload.work_units(params)
        if workload.name != "matmul" or price > request.spec.max_price:
            await abort(context, grpc.StatusCode.FAILED_PRECONDITION, "matmul within max_price only")
        job = Job(
            job_id="job_" + secrets.token_hex(8), spec=request.spec,
            spec_bytes=request.spec.SerializeToString(deterministic=True), client_address=client.address, price=price,
        )  # fmt: skip
        try:
            await self.wallet.PlaceHold(
                wallet_pb2.PlaceHoldRequest(job_id=job.job_id, address=client.address, amount=request.spec.max_price),
                metadata=self.wallet_md, timeout=10,
            )  # fmt: skip
        except grpc.aio.AioRpcError as err:
            await abort(context, err.code(), f"hold refused: {err.details()}")
        self.requests[(client.name, request.request_id)] = job.job_id
        self.jobs[job.job_id] = job
        self.order.append(job.job_id)
        self.queue.append(job)
        self.dispatch()
        return cpb.SubmitJobResponse(job=job.pb())

    async def GetJob(self, request: cpb.GetJobRequest, context: grpc.aio.ServicerContext) -> Any:
        client = await self.caller(context, "client")
        job = self.jobs.get(request.job_id)
        if job is None or job.client_address != client.address:
            await abort(context, grpc.StatusCode.NOT_FOUND, "no such job")
        return cpb.GetJobResponse(job=job.pb())

    async def ListJobs(self, request: cpb.ListJobsRequest, context: grpc.aio.ServicerContext) -> Any:
        client = await self.caller(context, "client")
        size = min(request.page_size or 50, 500)
        end = int(request.page_token) if request.page_token else len(self.order)
        states = set(request.states)
        out: list[cpb.Job] = []
        i = end
        while i > 0 and len(out) < size:
            i -= 1
            job = self.jobs[self.order[i]]
            if job.client_address == client.address and (not states or job.state in states):
                out.append(job.pb())
        return cpb.ListJobsResponse(jobs=out, next_page_token=str(i) if i > 0 else "")

    # -- miners --------------------------------------------------------------

    def dispatch(self) -> None:
        while self.queue and self.free:
            miner = self.free.popleft()
            if miner.gone:
                continue
            job = self.queue.popleft()
            job.lease_id, job.miner_id = "lease_" + secrets.token_hex(8), miner.miner_id
            job.move(cpb.JOB_STATE_ASSIGNED)
            miner.job = job
            miner.outbox.put_nowait(
                cpb.ConnectResponse(
                    assignment=cpb.Assignment(job_id=job.job_id, lease_id=job.lease_id, job_spec=job.spec_bytes)
                )
            )

    def release(self, miner: Miner) -> None:
        miner.job = None
        miner.output.clear()
        self.free.append(miner)
        self.dispatch()

    # A coroutine that reads and writes on the context, not a generator.
    async def Connect(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:  # type: ignore[override]
        who = await self.caller(context, "miner")
        first = await context.read()
        hello = first.hello if first is not grpc.aio.EOF else cpb.MinerHello()
        if not hello.miner_id or hello.miner_id != who.miner_id or len(hello.public_key) != 32:
            await abort(context, grpc.StatusCode.PERMISSION_DENIED, "bad hello")
        known = self.keys.setdefault(hello.miner_id, hello.public_key)
        if known != hello.public_key:
            await abort(context, grpc.StatusCode.PERMISSION_DENIED, "KEY_MISMATCH")
        miner = Miner(hello.miner_id, hello.public_key, hello.payout_address or who.address)
        await context.write(
            cpb.ConnectResponse(
                welcome=cpb.Welcome(
                    session_id=secrets.token_hex(8), network_id=self.network_id,
                    heartbeat_interval=duration(self.heartbeat),
                )
            )
        )  # fmt: skip
        reader = asyncio.create_task(self._read(miner, context))
        reader.add_done_callback(lambda _: miner.outbox.put_nowait(None))
        self.release(miner)
        try:
            while (msg := await miner.outbox.get()) is not None:
                await context.write(msg)
        finally:
            reader.cancel()
            miner.gone = True
            if miner.job is not None and miner.job.state in (cpb.JOB_STATE_ASSIGNED, cpb.JOB_STATE_RUNNING):
                miner.job.move(cpb.JOB_STATE_QUEUED)
                self.queue.appendleft(miner.job)
                self.dispatch()

    async def _read(self, miner: Miner, context: grpc.aio.ServicerContext) -> None:
        while (req := await context.read()) is not grpc.aio.EOF:
            kind = req.WhichOneof("msg")
            job = miner.job
            if kind == "heartbeat" or job is None:
                continue
            if kind == "accepted" and req.accepted.lease_id == job.lease_id:
                job.move(cpb.JOB_STATE_RUNNING)
            elif kind == "chunk" and req.chunk.lease_id == job.lease_id and req.chunk.offset == len(miner.output):
                miner.output += req.chunk.data
            elif kind == "result" and req.result.lease_id == job.lease_id:
                self._judge(miner, job, req.result.receipt)

    def _judge(self, miner: Miner, job: Job, receipt: signing_pb2.Signed) -> None:
        """Inline on the event loop: for a tiny matmul the whole check is a
        fraction of a millisecond, less than a hop to a thread."""
        job.move(cpb.JOB_STATE_VERIFYING)
        data = bytes(miner.output)
        detail = ""
        try:
            body = open_signed(receipt, crypto.RECEIPT_DOMAIN, miner.key, signing_pb2.ReceiptBody, "receipt")
        except InvalidArgument as exc:
            detail = exc.message
        else:
            bound = (body.network_id, body.job_id, body.lease_id, body.miner_id, body.job_spec_sha256)
            if bound != (self.network_id, job.job_id, job.lease_id, miner.miner_id, crypto.sha256(job.spec_bytes)):
                detail = "receipt binds the wrong job"
            elif body.output_sha256 != crypto.sha256(data) or body.output_size_bytes != len(data):
                detail = "output does not match the receipt"
            else:
                _, params = workload_of(job.spec)
                check = freivalds(params, data)
                detail = "" if check.ok else check.detail
        if detail:
            miner.outbox.put_nowait(cpb.ConnectResponse(ack=cpb.ResultAck(
                lease_id=job.lease_id, verdict=cpb.VERDICT_BAD_OUTPUT, detail=detail)))  # fmt: skip
            job.move(cpb.JOB_STATE_QUEUED)
            self.queue.append(job)
            self.release(miner)
            return
        fee = job.price * FEE_BPS // 10_000
        settlement = seal(
            signing_pb2.SettlementBody(
                network_id=self.network_id, job_id=job.job_id, client_address=job.client_address,
                miner_address=miner.payout, hold_amount=job.spec.max_price, miner_amount=job.price - fee,
                fee_amount=fee, receipt_sha256=crypto.sha256(receipt.body), verdict_time=ts_now(),
            ),
            crypto.SETTLEMENT_DOMAIN, self.key,
        )  # fmt: skip
        job.move(cpb.JOB_STATE_SETTLING)
        self.to_settle.append((job, settlement))
        self.settle_due.set()
        miner.outbox.put_nowait(cpb.ConnectResponse(ack=cpb.ResultAck(
            lease_id=job.lease_id, verdict=cpb.VERDICT_ACCEPTED, miner_amount=job.price - fee)))  # fmt: skip
        self.release(miner)

    async def settler(self) -> None:
        """One SettleHolds call at a time, carrying everything verified while
        the last one was out."""
        while True:
            await self.settle_due.wait()
            self.settle_due.clear()
            while self.to_settle:
                batch, self.to_settle = self.to_settle[:SETTLE_BATCH], self.to_settle[SETTLE_BATCH:]
                try:
                    resp = await self.wallet.SettleHolds(
                        wallet_pb2.SettleHoldsRequest(settlements=[s for _, s in batch]),
                        metadata=self.wallet_md, timeout=30,
                    )  # fmt: skip
                except grpc.aio.AioRpcError:
                    self.to_settle += batch
                    await asyncio.sleep(0.5)
                    continue
                for (job, s), r in zip(batch, resp.results, strict=True):
                    if r.HasField("error"):
                        self.to_settle.append((job, s))
                    else:
                        job.move(cpb.JOB_STATE_SETTLED)


async def serve(args: argparse.Namespace) -> None:
    # The generated stubs declare every method abstract; those left out here
    # keep the generated bodies, which answer UNIMPLEMENTED.
    core: Baseline = cast(Any, Baseline)(args, os.environ.get("AITBC_COORD_WALLET_TOKEN", ""))
    server = grpc.aio.server()
    coordinator_pb2_grpc.add_CoordinatorServiceServicer_to_server(core, server)
    coordinator_pb2_grpc.add_MinerGatewayServiceServicer_to_server(core, server)
    port = server.add_insecure_port(f"127.0.0.1:{args.port}")
    await server.start()
    settler = asyncio.create_task(core.settler())
    write_ready_file(args.ready_file, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    settler.cancel()
    await server.stop(1)


def main() -> None:
    ap = argparse.ArgumentParser(prog="bench.baseline", description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--tokens-file", required=True)
    ap.add_argument("--key-file", required=True)
    ap.add_argument("--wallet-target", required=True)
    ap.add_argument("--ready-file", default="")
    ap.add_argument("--network-id", default="aitbc-devnet")
    ap.add_argument("--heartbeat-secs", type=float, default=5.0)
    # Taken for the coordinator's command line (aitbc.localnet), unused.
    for unused in ("--db", "--blobs-dir", "--metrics-port", "--rate-limits"):
        ap.add_argument(unused, default="")
    asyncio.run(serve(ap.parse_args()))


if __name__ == "__main__":
    main()
