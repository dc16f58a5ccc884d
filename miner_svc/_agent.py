"""The sidecar's connection to the coordinator: out-bound only, one stream,
work pushed down it. Reconnects with exponential backoff and jitter."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import random
import secrets
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import structlog

import aitbc
from aitbc import crypto
from aitbc.auth import auth_metadata
from aitbc.config import EX_CONFIG, EX_NOPERM
from aitbc.rpc import channel as rpc_channel
from aitbc.rpc import error_reason
from aitbc.signed import seal
from aitbc.timeutil import duration, ts_now
from aitbc.tls import TlsConfig
from aitbc.v1 import coordinator_pb2 as cpb
from aitbc.v1 import coordinator_pb2_grpc, signing_pb2
from miner_svc import _metrics as M
from miner_svc._gpu import Gpu, Nvml
from miner_svc._prepare import prepare
from miner_svc._runs import RunOutcome
from miner_svc._state import RESULTS_DIR
from miner_svc._worker import JobFailed, SlotPool

log = structlog.get_logger()

CHUNK_BYTES = 1024 * 1024
MAX_BACKOFF_SECS = 10.0
# Errors a reconnect cannot fix: the owner or the operator must. The exit
# status tells systemd not to restart (RestartPreventExitStatus=77 78).
FATAL_CODES = {
    grpc.StatusCode.UNAUTHENTICATED: EX_NOPERM,
    grpc.StatusCode.PERMISSION_DENIED: EX_NOPERM,
    grpc.StatusCode.INVALID_ARGUMENT: EX_CONFIG,
}
# What the owner does about each refusal (ErrorInfo reason).
FIXES = {
    "BAD_TOKEN": "the token is unknown or revoked: ask the network's operator for a new miner token (API_KEY)",
    "TOKEN_EXPIRED": "the token has expired: ask the network's operator for a new one (API_KEY)",
    "MISSING_TOKEN": "set API_KEY to the miner token the network issued you",
    "ROLE_NOT_ALLOWED": "API_KEY is not a miner token: ask the operator for one issued with --role miner",
    "MINER_ID_MISMATCH": "the token belongs to another MINER_ID: set MINER_ID to the one it was issued for",
    "NO_MINER_ID": "the token names no miner id: ask the operator for a miner token issued with --miner-id",
    "TOKEN_REVOKED": "the operator revoked this token while it was connected: ask for a new one (API_KEY)",
    "KEY_MISMATCH": "the coordinator holds another key for this MINER_ID: restore STATE_DIR/miner.key from your "
    "backup, or send `aitbc-miner show-key`'s output to the operator to re-key this miner (README, Lost miner key)",
    "MINER_BANNED": "the network banned this miner for refused results: talk to its operator",
}


@dataclass(frozen=True)
class MinerConfig:
    coord_url: str
    api_key: str
    miner_id: str
    payout_address: str
    # Scratch: running jobs' inputs and outputs, emptied at start.
    work_dir: Path
    heartbeat_secs: float
    slots: int
    device: str  # "cuda" or "cpu"
    gpus: tuple[Gpu, ...]
    max_runtime: float = 3600.0
    # "workload/name" -> local folder of each model it holds.
    models: dict[str, str] = dataclasses.field(default_factory=dict)
    # Assignments taken beyond the slots, prepared while the slots work.
    prefetch: int = 1
    # Share of its GPU's memory one job may allocate.
    vram_cap_fraction: float = 0.95
    # TLS to the coordinator (mutual when it has a certificate).
    tls: TlsConfig | None = None
    # Lasting: finished results waiting for delivery (in results/).
    state_dir: Path | None = None

    @property
    def results_dir(self) -> Path:
        return (self.state_dir or self.work_dir) / RESULTS_DIR


class FatalMinerError(Exception):
    """The coordinator refused this miner for a reason a retry cannot fix."""

    def __init__(self, message: str, *, exit_status: int = EX_NOPERM, reason: str = "") -> None:
        super().__init__(message)
        self.exit_status = exit_status
        self.reason = reason

    @property
    def fix(self) -> str:
        return FIXES.get(self.reason, "check API_KEY, MINER_ID and WALLET_ADDR against what the operator issued")


class MinerAgent:
    def __init__(self, config: MinerConfig, key: crypto.KeyPair, pool: SlotPool, nvml: Nvml | None = None) -> None:
        self.config = config
        self.nvml = nvml or Nvml()
        self.key = key
        self.pool = pool
        self.network_id = ""
        self.earned = 0
        self.on_welcome: asyncio.Event = asyncio.Event()
        # Work outlives a connection: a job keeps running through a
        # reconnect, and a finished result waits (its output on disk) until
        # a stream is up to take it.
        self._running: dict[str, asyncio.Task[None]] = {}
        self._finished: dict[str, cpb.ConnectRequest] = {}  # lease -> result or failure message
        self._outputs: dict[str, Path] = {}
        self._out: asyncio.Queue[cpb.ConnectRequest | None] | None = None
        self._uploads: set[asyncio.Task[None]] = set()
        self._welcomed = False
        self.draining = False
        self.start_time = ts_now()
        self.job_of: dict[str, str] = {}  # lease -> job, for the admin API
        self._started: set[str] = set()  # leases that hold a slot (not only prefetched)
        self.progress_of: dict[str, float] = {}
        self.reputation = 0.0  # as the coordinator last told us
        M.RUNNING.set_function(lambda: len(self._running))

    def hello(self) -> cpb.MinerHello:
        c = self.config
        return cpb.MinerHello(
            miner_id=c.miner_id,
            public_key=self.key.public_key,
            payout_address=c.payout_address,
            in_flight_lease_ids=sorted(set(self._running) | set(self._finished)),
            version=aitbc.__version__,
            capabilities=cpb.Capabilities(
                workloads=["matmul", *sorted({key.split("/")[0] for key in c.models})],
                models=[
                    cpb.ModelInfo(workload=workload, name=name)
                    for workload, _, name in sorted(key.partition("/") for key in c.models)
                ],
                slots=c.slots,
                prefetch=c.prefetch,
                accel=cpb.ACCEL_KIND_CUDA if c.device == "cuda" else cpb.ACCEL_KIND_CPU,
                gpus=[
                    cpb.GpuInfo(
                        index=g.index,
                        name=g.name,
                        uuid=g.uuid,
                        memory_total_bytes=g.memory_total_bytes,
                        driver_version=g.driver_version,
                        cuda_version=g.cuda_version,
                    )
                    for g in c.gpus
                ],
            ),
        )

    async def run_forever(self, stop: asyncio.Event) -> None:
        backoff = 0.5
        while not stop.is_set():
            self._welcomed = False
            try:
                await self._session(stop)
            except FatalMinerError:
                raise
            except grpc.aio.AioRpcError as err:
                if err.code() == grpc.StatusCode.INTERNAL and not self._welcomed:
                    # grpc.aio can report a stream the server refused before
                    # reading (a bad token) as "Internal error from Core"
                    # (grpc/grpc#36066): ask again with a unary call.
                    err = await self._authorization() or err
                if err.code() in FATAL_CODES:
                    reason = error_reason(err)
                    raise FatalMinerError(
                        f"coordinator refused this miner: {err.code().name} {reason}: {err.details()}",
                        exit_status=FATAL_CODES[err.code()],
                        reason=reason,
                    ) from None
                log.warning("coordinator_unreachable", code=err.code().name, details=err.details())
            if stop.is_set():
                break
            if self._welcomed:
                # The link worked until just now: come back fast; back off
                # only while the coordinator stays unreachable.
                backoff = 0.5
            delay = backoff * random.uniform(0.5, 1.5)
            log.info("reconnecting", in_seconds=round(delay, 2))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=delay)
            # Capped well under a lease: a coordinator that comes back finds
            # its miners again before their leases run out.
            backoff = min(backoff * 2, MAX_BACKOFF_SECS)

    async def _authorization(self) -> grpc.aio.AioRpcError | None:
        """The coordinator's refusal of this token, if it refuses it: a key
        rotation with nothing signed is authorized first, then refused as
        unsigned, changing nothing."""
        try:
            async with rpc_channel(self.config.coord_url, self.config.tls) as channel:
                await coordinator_pb2_grpc.MinerGatewayServiceStub(channel).RotateKey(
                    cpb.RotateKeyRequest(), metadata=auth_metadata(self.config.api_key), timeout=10
                )
        except grpc.aio.AioRpcError as err:
            return err if err.code() in FATAL_CODES and error_reason(err) != "BAD_SIGNATURE" else None
        return None

    async def _session(self, stop: asyncio.Event) -> None:
        out: asyncio.Queue[cpb.ConnectRequest | None] = asyncio.Queue()
        out.put_nowait(cpb.ConnectRequest(hello=self.hello()))

        async def requests() -> AsyncIterator[cpb.ConnectRequest]:
            while True:
                msg = await out.get()
                if msg is None:
                    return
                yield msg

        channel = rpc_channel(self.config.coord_url, self.config.tls)
        heartbeat: asyncio.Task[None] | None = None
        stopper = asyncio.create_task(stop.wait())
        try:
            stub = coordinator_pb2_grpc.MinerGatewayServiceStub(channel)
            call = stub.Connect(requests(), metadata=auth_metadata(self.config.api_key))
            try:
                responses = call.__aiter__()
                while True:
                    nxt = asyncio.ensure_future(anext(responses))
                    done, _ = await asyncio.wait({nxt, stopper}, return_when=asyncio.FIRST_COMPLETED)
                    if nxt not in done:
                        nxt.cancel()
                        break
                    try:
                        msg = nxt.result()
                    except StopAsyncIteration:
                        log.info("stream_closed_by_coordinator")
                        break
                    kind = msg.WhichOneof("msg")
                    if kind == "welcome":
                        self.network_id = msg.welcome.network_id
                        interval = (
                            msg.welcome.heartbeat_interval.ToTimedelta().total_seconds() or self.config.heartbeat_secs
                        )
                        heartbeat = asyncio.create_task(self._heartbeats(out, interval))
                        log.info("connected", session_id=msg.welcome.session_id, network_id=self.network_id)
                        self._out = out
                        self._welcomed = True
                        for lease_id in list(self._finished):
                            self._deliver(lease_id)
                        self.on_welcome.set()
                    elif kind == "assignment":
                        a = msg.assignment
                        if self.draining:
                            # Sent before the coordinator heard we drain: hand it back.
                            out.put_nowait(cpb.ConnectRequest(
                                failure=cpb.JobFailure(lease_id=a.lease_id, reason="miner is shutting down")
                            ))  # fmt: skip
                            continue
                        self._running[a.lease_id] = asyncio.create_task(self._run(a))
                    elif kind == "cancel":
                        self._drop(msg.cancel.lease_id, msg.cancel.reason)
                    elif kind == "ack":
                        ack = msg.ack
                        M.VERDICTS.labels(cpb.Verdict.Name(ack.verdict).removeprefix("VERDICT_")).inc()
                        if ack.verdict == cpb.VERDICT_ACCEPTED:
                            self.earned += ack.miner_amount
                            M.EARNED.inc(ack.miner_amount)
                        if ack.reputation:
                            self.reputation = ack.reputation
                        self._forget(ack.lease_id)
                        log.info(
                            "result_acknowledged",
                            lease_id=ack.lease_id,
                            verdict=cpb.Verdict.Name(ack.verdict),
                            detail=ack.detail,
                            miner_amount=ack.miner_amount,
                        )
            finally:
                self._out = None
                out.put_nowait(None)
                call.cancel()
        finally:
            stopper.cancel()
            if heartbeat:
                heartbeat.cancel()
            self.on_welcome.clear()
            await channel.close()

    @property
    def connected(self) -> bool:
        return self._out is not None

    def running_leases(self) -> list[str]:
        return list(self._running)

    def finished_leases(self) -> list[str]:
        return list(self._finished)

    def heartbeat_message(self) -> cpb.ConnectRequest:
        return self._heartbeat()

    def _progress(self, lease_id: str, fraction: float, message: str) -> None:
        self.progress_of[lease_id] = fraction
        if self._out is not None:  # progress is news, not worth keeping for later
            self._out.put_nowait(
                cpb.ConnectRequest(progress=cpb.JobProgress(lease_id=lease_id, fraction=fraction, message=message))
            )

    def _drop(self, lease_id: str, reason: str) -> None:
        task = self._running.pop(lease_id, None)
        if task:
            task.cancel()
        self._forget(lease_id)
        log.info("assignment_cancelled", lease_id=lease_id, reason=reason)

    def recover(self) -> int:
        """Pick up results a previous process finished but did not deliver,
        and empty the scratch space of jobs that died mid-run (their leases
        lapse). A finished result still in WORK_DIR (an older release kept
        them there) moves into the spool first."""
        spool = self.config.results_dir
        jobs = self.config.work_dir / "jobs"
        for job_dir in sorted(jobs.glob("*")) if jobs.exists() else []:
            if (job_dir / RESULT_FILE).exists():
                spool.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(spool / job_dir.name, ignore_errors=True)
                shutil.move(job_dir, spool / job_dir.name)
                log.info("result_moved_to_state_dir", lease_id=job_dir.name, spool=str(spool))
            else:
                shutil.rmtree(job_dir, ignore_errors=True)
        for job_dir in sorted(spool.glob("*")) if spool.exists() else []:
            result_file = job_dir / RESULT_FILE
            if not result_file.exists():
                shutil.rmtree(job_dir, ignore_errors=True)  # cut short while moving in
                continue
            msg = cpb.ConnectRequest.FromString(result_file.read_bytes())
            self._finished[msg.result.lease_id] = msg
            self._outputs[msg.result.lease_id] = job_dir / "output.bin"
        if self._finished:
            log.info("results_recovered", count=len(self._finished))
        return len(self._finished)

    def _forget(self, lease_id: str) -> None:
        self._finished.pop(lease_id, None)
        self.job_of.pop(lease_id, None)
        self.progress_of.pop(lease_id, None)
        path = self._outputs.pop(lease_id, None)
        if path is not None:
            shutil.rmtree(path.parent, ignore_errors=True)

    def _deliver(self, lease_id: str) -> None:
        """Send a finished job's output and result on the current stream, if
        there is one; otherwise it waits for the next."""
        out, msg = self._out, self._finished.get(lease_id)
        if out is None or msg is None:
            return
        path = self._outputs.get(lease_id)
        if msg.WhichOneof("msg") == "result" and path is not None:
            task = asyncio.create_task(self._upload_then(path, lease_id, msg, out))
            self._uploads.add(task)
            task.add_done_callback(self._uploads.discard)
        else:
            out.put_nowait(msg)
            self._forget(lease_id)  # failures are not acknowledged

    async def _upload_then(
        self, path: Path, lease_id: str, msg: cpb.ConnectRequest, out: asyncio.Queue[cpb.ConnectRequest | None]
    ) -> None:
        await self._upload(path, lease_id, out)
        out.put_nowait(msg)

    async def drain(self, grace: float) -> None:
        """SIGTERM: take no new work, let running jobs finish and their
        results be acknowledged, for up to grace seconds. What is still
        running then is handed back when the stream closes."""
        self.draining = True
        if self._out is not None:
            self._out.put_nowait(self._heartbeat())
        log.info("draining", running=len(self._running), grace_seconds=grace)
        # Prefetched jobs that never started go back at once, for another miner.
        for lease_id in [lease for lease in self._running if lease not in self._started]:
            self._running.pop(lease_id).cancel()
            self._finished[lease_id] = cpb.ConnectRequest(
                failure=cpb.JobFailure(lease_id=lease_id, reason="miner is shutting down")
            )
            self._deliver(lease_id)
        deadline = asyncio.get_running_loop().time() + grace
        if self._running:
            await asyncio.wait(list(self._running.values()), timeout=grace)
        while self._finished and asyncio.get_running_loop().time() < deadline:  # noqa: ASYNC110 - acks arrive on the stream
            await asyncio.sleep(0.05)
        log.info("drained", handed_back=len(self._running), undelivered=len(self._finished))

    def _heartbeat(self) -> cpb.ConnectRequest:
        free = 0 if self.draining else max(0, self.config.slots - len(self._running))
        now = self.nvml.telemetry()
        for t in now:
            for name, g in M.GPU.items():
                g.labels(str(t.index)).set(getattr(t, name))
        telemetry = [
            cpb.GpuTelemetry(
                index=t.index, utilization_percent=t.utilization_percent, memory_used_bytes=t.memory_used_bytes,
                power_watts=t.power_watts, temperature_celsius=t.temperature_celsius,
            )
            for t in now
        ]  # fmt: skip
        return cpb.ConnectRequest(
            heartbeat=cpb.MinerHeartbeat(free_slots=free, draining=self.draining, telemetry=telemetry)
        )

    async def _heartbeats(self, out: asyncio.Queue[cpb.ConnectRequest | None], interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            out.put_nowait(self._heartbeat())

    async def _run(self, a: cpb.Assignment) -> None:
        structlog.contextvars.bind_contextvars(job_id=a.job_id, lease_id=a.lease_id)
        self.job_of[a.lease_id] = a.job_id
        job_dir = self.config.work_dir / "jobs" / a.lease_id
        spooled = self.config.results_dir / a.lease_id
        try:
            if not self.pool.has_free_slot():
                # Prefetched: make its inputs while the slots finish earlier
                # jobs. (With a slot free the worker makes them itself,
                # without a trip through the disk.)
                await asyncio.to_thread(prepare, a.job_spec, job_dir)
            async with self.pool.slot() as slot:
                self._started.add(a.lease_id)
                if self._out is not None:
                    self._out.put_nowait(cpb.ConnectRequest(accepted=cpb.AssignmentAccepted(lease_id=a.lease_id)))
                log.info("job_started", device=self.config.device, slot=slot.index)
                start = ts_now()
                with self.nvml.energy_meter(slot.index) as meter:
                    outcome: RunOutcome = await slot.run(
                        a.job_spec,
                        self.config.device,
                        str(job_dir / "output.bin"),
                        self.config.models,
                        max_runtime=self.config.max_runtime,
                        on_progress=lambda fraction, message: self._progress(a.lease_id, fraction, message),
                    )
            if meter.joules:
                outcome = dataclasses.replace(outcome, energy_joules=meter.joules)
            finish = ts_now()
            body = signing_pb2.ReceiptBody(
                network_id=self.network_id,
                job_id=a.job_id,
                lease_id=a.lease_id,
                miner_id=self.config.miner_id,
                job_spec_sha256=crypto.sha256(a.job_spec),
                output_sha256=outcome.output_sha256,
                output_size_bytes=outcome.output_size,
                usage=signing_pb2.Usage(
                    device=outcome.device,
                    run_duration=duration(outcome.run_seconds),
                    flops=outcome.flops,
                    tflops=outcome.tflops,
                    energy_joules=outcome.energy_joules,
                    work_items=outcome.work_items,
                    items_per_second=outcome.work_items / outcome.run_seconds if outcome.run_seconds > 0 else 0.0,
                ),
                start_time=start,
                finish_time=finish,
                nonce=secrets.token_bytes(16),
            )
            receipt = seal(body, crypto.RECEIPT_DOMAIN, self.key)
            result = cpb.ConnectRequest(result=cpb.JobResult(lease_id=a.lease_id, receipt=receipt))
            # Into STATE_DIR beside its output, so a result survives a
            # sidecar restart (and a wiped WORK_DIR) and is delivered by the
            # next process; the result file last, as the mark of a whole one.
            output = await asyncio.to_thread(_spool_output, Path(outcome.output_path), spooled)
            _write_atomic(spooled / RESULT_FILE, result.SerializeToString())
            shutil.rmtree(job_dir, ignore_errors=True)
            self._outputs[a.lease_id] = output
            self._finished[a.lease_id] = result
            log.info("job_finished", tflops=round(outcome.tflops, 4), seconds=round(outcome.run_seconds, 4))
            M.JOBS.labels("finished").inc()
        except asyncio.CancelledError:
            shutil.rmtree(job_dir, ignore_errors=True)
            shutil.rmtree(spooled, ignore_errors=True)
            raise
        except Exception as exc:
            reason = str(exc) if isinstance(exc, JobFailed) else repr(exc)
            log.warning("job_failed", error=reason)
            M.JOBS.labels("failed").inc()
            shutil.rmtree(job_dir, ignore_errors=True)
            shutil.rmtree(spooled, ignore_errors=True)
            self._finished[a.lease_id] = cpb.ConnectRequest(
                failure=cpb.JobFailure(lease_id=a.lease_id, reason=reason[:500])
            )
        finally:
            self._running.pop(a.lease_id, None)
            self._started.discard(a.lease_id)
        self._deliver(a.lease_id)

    async def _upload(self, path: Path, lease_id: str, out: asyncio.Queue[cpb.ConnectRequest | None]) -> None:
        offset = 0
        with path.open("rb") as f:
            while True:
                data = await asyncio.to_thread(f.read, CHUNK_BYTES)
                if not data:
                    break
                out.put_nowait(cpb.ConnectRequest(chunk=cpb.ResultChunk(lease_id=lease_id, offset=offset, data=data)))
                offset += len(data)
                # Let the stream drain so a large result does not pile up in memory.
                while out.qsize() > 4:  # noqa: ASYNC110 - the queue is shared and unbounded by design
                    await asyncio.sleep(0.005)


RESULT_FILE = "result.pb"


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def _spool_output(output: Path, spooled: Path) -> Path:
    """Move a finished output into the spool (a rename when WORK_DIR is on
    the same file system, as by default) and make it durable there."""
    spooled.mkdir(parents=True, exist_ok=True)
    dest = spooled / "output.bin"
    shutil.move(output, dest)
    fd = os.open(dest, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return dest
