"""CoordinatorService and MinerGatewayService: proto <-> core."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import grpc
import structlog

from aitbc import crypto
from aitbc.addresses import check_address
from aitbc.audit import audit
from aitbc.auth import Principal, TokenTable, bearer_token, hash_token
from aitbc.errors import AitbcError, FailedPrecondition, InvalidArgument, PermissionDenied, Unauthenticated
from aitbc.server import principal
from aitbc.signed import open_signed
from aitbc.timeutil import duration, ts_from_iso
from aitbc.v1 import coordinator_pb2 as cpb
from aitbc.v1 import coordinator_pb2_grpc, signing_pb2
from aitbc.wellformed import check_timestamp
from coordinator_svc import _store as st
from coordinator_svc._checks import operator_of
from coordinator_svc._jobs import Coordinator, MinerSession, load_runs, reputation
from coordinator_svc._metrics import version_label
from coordinator_svc._store import JobRecord

log = structlog.get_logger()

HELLO_TIMEOUT = 10.0
# GPUs one miner may declare: each is a set of metric labels while it is here.
MAX_GPUS = 64
# A hello is held for the stream's life: each list in it is bounded by far
# more than an honest sidecar sends (it holds at most slots + prefetch leases).
MAX_HELLO_LEASES = 1024
MAX_WORKLOADS = 32
MAX_MODELS = 256
MAX_NAME = 128

_STATE = {
    st.HOLDING: cpb.JOB_STATE_QUEUED,
    st.QUEUED: cpb.JOB_STATE_QUEUED,
    st.ASSIGNED: cpb.JOB_STATE_ASSIGNED,
    st.RUNNING: cpb.JOB_STATE_RUNNING,
    st.VERIFYING: cpb.JOB_STATE_VERIFYING,
    st.SETTLING: cpb.JOB_STATE_SETTLING,
    st.SETTLED: cpb.JOB_STATE_SETTLED,
    st.FAILED: cpb.JOB_STATE_FAILED,
    st.CANCELLED: cpb.JOB_STATE_CANCELLED,
    st.EXPIRED: cpb.JOB_STATE_EXPIRED,
}


_STATE_NAMES = {v: k for k, v in _STATE.items() if k != st.HOLDING}


def _hidden(states: object) -> set[str]:
    """A job whose hold is being placed shows as QUEUED; list it so too."""
    return {st.HOLDING} if cpb.JOB_STATE_QUEUED in states else set()  # type: ignore[operator]


def job_pb(rec: JobRecord, progress: tuple[float, str] | None = None) -> cpb.Job:
    job = cpb.Job(
        job_id=rec.job_id,
        state=_STATE[rec.state],
        spec=cpb.JobSpec.FromString(rec.spec),
        client_address=rec.client_address,
        miner_id=rec.miner_id,
        attempts=rec.attempts,
        price=rec.price,
        miner_amount=rec.miner_amount,
        fee_amount=rec.fee_amount,
        status_detail=rec.status_detail,
        verdict=cpb.Verdict.Value(f"VERDICT_{rec.verdict}") if rec.verdict else cpb.VERDICT_UNSPECIFIED,
        output_sha256=rec.output_sha256,
        create_time=ts_from_iso(rec.create_time),
        update_time=ts_from_iso(rec.update_time),
        runs_needed=rec.runs_needed,
        version=rec.version,
        runs=[
            cpb.RunRecord(
                miner_id=r.miner_id,
                verdict=cpb.Verdict.Value(f"VERDICT_{r.verdict}"),
                detail=r.detail,
                output_sha256=bytes.fromhex(r.output_sha256),
                reputation=r.reputation,
            )
            for r in load_runs(rec)
        ],
    )
    if rec.verification:
        job.verification.ParseFromString(rec.verification)
    if progress is not None and rec.state == st.RUNNING:
        job.progress, job.progress_message = progress
    if rec.usage:
        job.usage.ParseFromString(rec.usage)
    if rec.receipt:
        job.receipt.ParseFromString(rec.receipt)
    if rec.settlement:
        job.settlement.ParseFromString(rec.settlement)
    return job


class CoordinatorServicer(coordinator_pb2_grpc.CoordinatorServiceServicer):
    def __init__(self, core: Coordinator) -> None:
        self._core = core

    async def SubmitJob(
        self, request: cpb.SubmitJobRequest, context: grpc.aio.ServicerContext
    ) -> cpb.SubmitJobResponse:
        caller = principal()
        if not caller.address:
            raise FailedPrecondition("this client token has no wallet address to pay from", reason="NO_ACCOUNT")
        rec = await self._core.submit(caller, request.spec, request.request_id)
        structlog.contextvars.bind_contextvars(job_id=rec.job_id)
        return cpb.SubmitJobResponse(job=job_pb(rec))

    async def GetJob(self, request: cpb.GetJobRequest, context: grpc.aio.ServicerContext) -> cpb.GetJobResponse:
        rec = await self._core.get(principal(), request.job_id)
        return cpb.GetJobResponse(job=job_pb(rec, self._core.progress_of.get(rec.job_id)))

    async def WatchJob(
        self, request: cpb.WatchJobRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[cpb.WatchJobResponse]:
        async for rec in self._core.watch(principal(), request.job_id):
            yield cpb.WatchJobResponse(job=job_pb(rec, self._core.progress_of.get(rec.job_id)))

    async def ListJobs(self, request: cpb.ListJobsRequest, context: grpc.aio.ServicerContext) -> cpb.ListJobsResponse:
        states = sorted({_STATE_NAMES[s] for s in request.states if s in _STATE_NAMES} | _hidden(request.states))
        unknown = [s for s in request.states if s not in _STATE_NAMES]
        if unknown:
            raise InvalidArgument(f"unknown job state {unknown[0]}", field="states")
        jobs, token = await self._core.list_jobs(principal(), states, request.page_size, request.page_token)
        return cpb.ListJobsResponse(jobs=[job_pb(j) for j in jobs], next_page_token=token)

    async def CancelJob(
        self, request: cpb.CancelJobRequest, context: grpc.aio.ServicerContext
    ) -> cpb.CancelJobResponse:
        return cpb.CancelJobResponse(job=job_pb(await self._core.cancel(principal(), request.job_id)))

    async def GetJobResult(
        self, request: cpb.GetJobResultRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[cpb.GetJobResultResponse]:
        first = True
        async for offset, data, total, digest in self._core.result_chunks(principal(), request.job_id):
            msg = cpb.GetJobResultResponse(offset=offset, data=data)
            if first:
                msg.total_size_bytes = total
                msg.output_sha256 = digest
                first = False
            yield msg


class MinerGatewayServicer(coordinator_pb2_grpc.MinerGatewayServiceServicer):
    def __init__(self, core: Coordinator, tokens: TokenTable | None = None) -> None:
        self._core = core
        # The gate's table: an open stream's token is checked against it
        # for as long as the stream lasts, not only when it opens.
        self._tokens = tokens
        self._cleanup: set[asyncio.Task[None]] = set()

    async def Connect(
        self, request_iterator: AsyncIterator[cpb.ConnectRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[cpb.ConnectResponse]:
        caller = principal()
        try:
            first = await asyncio.wait_for(anext(request_iterator), timeout=HELLO_TIMEOUT)
        except (StopAsyncIteration, TimeoutError):
            raise FailedPrecondition("the stream must open with a hello", reason="HELLO_REQUIRED") from None
        if first.WhichOneof("msg") != "hello":
            raise FailedPrecondition("the stream must open with a hello", reason="HELLO_REQUIRED")
        session = await self._register(caller.miner_id, caller.address, first.hello)
        token = bearer_token(context.invocation_metadata())
        if self._tokens is not None and token is not None:
            session.token_check = _token_check(self._tokens, hash_token(token), caller)
        structlog.contextvars.bind_contextvars(miner_id=session.miner_id)
        session.operator = operator_of(caller.name)
        reader: asyncio.Task[None] | None = None
        reason = "stream closed by miner"
        try:
            await self._core.miner_joined(session, frozenset(first.hello.in_flight_lease_ids))
            if session.closed_by is not None:  # its key was replaced meanwhile
                raise session.closed_by
            yield cpb.ConnectResponse(
                welcome=cpb.Welcome(
                    session_id=session.session_id,
                    network_id=self._core.settings.network_id,
                    heartbeat_interval=duration(self._core.settings.heartbeat_secs),
                )
            )
            reader = asyncio.create_task(self._read(session, request_iterator))
            while True:
                get = asyncio.ensure_future(session.outbox.get())
                done, _ = await asyncio.wait({get, reader}, return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                    failed = reader.exception()
                    if isinstance(failed, AitbcError):  # a malformed message: say so
                        raise failed
                    break
                msg = get.result()
                if msg is None:
                    if session.closed_by is not None:
                        reason = session.closed_by.message
                        raise session.closed_by
                    reason = "replaced by a newer stream or shutting down"
                    break
                yield msg
        finally:
            if reader is not None:
                reader.cancel()
            # Runs as its own task: the handler may be being cancelled.
            task = asyncio.create_task(self._core.miner_left(session, reason))
            self._cleanup.add(task)
            task.add_done_callback(self._cleanup.discard)

    async def RotateKey(
        self, request: cpb.RotateKeyRequest, context: grpc.aio.ServicerContext
    ) -> cpb.RotateKeyResponse:
        caller = principal()
        _check_names_miner(caller.miner_id)
        body = open_signed(request.rotation, crypto.KEY_ROTATION_DOMAIN, None, signing_pb2.KeyRotationBody, "rotation")
        if body.network_id != self._core.settings.network_id:
            raise FailedPrecondition("the rotation names another network", reason="WRONG_NETWORK")
        if body.miner_id != caller.miner_id:
            raise PermissionDenied("this token does not speak for that miner", reason="MINER_ID_MISMATCH")
        new_key = crypto.check_public_key(body.new_public_key, field="rotation.new_public_key")
        if not crypto.verify(crypto.KEY_ROTATION_DOMAIN, request.rotation.body, request.new_key_signature, new_key):
            raise InvalidArgument("the new key did not sign the rotation", field="new_key_signature",
                                  reason="BAD_SIGNATURE")  # fmt: skip
        check_timestamp(body.create_time, "rotation.create_time")
        age = abs(time.time() - body.create_time.ToNanoseconds() / 1e9)
        if age > 300:
            raise FailedPrecondition("the rotation is more than 5 minutes old or early", reason="STALE_ROTATION")
        old_key = request.rotation.public_key
        rotated = await self._core.db(self._core.store.rotate_miner_key, body.miner_id, old_key, new_key)
        if not rotated:
            raise PermissionDenied("the rotation is not signed by the miner's current key", reason="KEY_MISMATCH")
        audit("miner_key_rotated", miner_id=body.miner_id, old_key=old_key.hex(), new_key=new_key.hex())
        await self._core.check_miner_key(body.miner_id)
        return cpb.RotateKeyResponse(public_key=new_key)

    async def _register(self, token_miner_id: str, token_address: str, hello: cpb.MinerHello) -> MinerSession:
        _check_names_miner(token_miner_id)
        if not hello.miner_id or len(hello.miner_id) > 128:
            raise InvalidArgument("hello.miner_id is required (at most 128 characters)", field="hello.miner_id")
        if hello.miner_id != token_miner_id:
            raise PermissionDenied(
                f"this token speaks for miner {token_miner_id!r}, not {hello.miner_id!r}", reason="MINER_ID_MISMATCH"
            )
        key = crypto.check_public_key(hello.public_key, field="hello.public_key")
        payout = hello.payout_address or token_address
        check_address(payout, field="hello.payout_address")
        caps = hello.capabilities
        if caps.slots < 1 or caps.slots > 64:
            raise InvalidArgument("capabilities.slots must be in 1..64", field="hello.capabilities.slots")
        if caps.prefetch > 4:
            raise InvalidArgument("capabilities.prefetch must be in 0..4", field="hello.capabilities.prefetch")
        if len(caps.gpus) > MAX_GPUS:
            raise InvalidArgument(
                f"capabilities.gpus may list at most {MAX_GPUS} GPUs", field="hello.capabilities.gpus"
            )
        _check_hello_lists(hello)
        standing = await self._core.db(self._core.store.standing, hello.miner_id)
        if self._core.banned(standing):
            raise PermissionDenied(
                f"miner {hello.miner_id!r} is banned: {standing[1]} of its results were refused",
                reason="MINER_BANNED",
            )
        registered, created = await self._core.db(self._core.store.register_miner, hello.miner_id, key, payout)
        if created:
            audit("miner_key_registered", miner_id=hello.miner_id, key=key.hex(), payout_address=payout)
        if registered != key:
            audit("miner_key_mismatch", miner_id=hello.miner_id, presented=key.hex())
            raise PermissionDenied(f"miner {hello.miner_id!r} is registered with another key", reason="KEY_MISMATCH")
        gpu = caps.accel == cpb.ACCEL_KIND_CUDA and len(caps.gpus) > 0
        version = version_label(hello.version)
        if version == "other":
            log.info("miner_version_unrecognised", miner_id=hello.miner_id, version=hello.version[:64])
        return MinerSession(
            version=version,
            reputation=reputation(*standing),
            miner_id=hello.miner_id,
            public_key=key,
            payout_address=payout,
            workloads=frozenset(caps.workloads),
            slots=caps.slots,
            gpu=gpu,
            max_vram=max((g.memory_total_bytes for g in caps.gpus), default=0),
            gpus=frozenset(g.index for g in caps.gpus),
            models=frozenset(f"{m.workload}/{m.name}" for m in caps.models),
            prefetch=caps.prefetch,
        )

    async def _read(self, session: MinerSession, requests: AsyncIterator[cpb.ConnectRequest]) -> None:
        core = self._core
        try:
            async for req in requests:
                kind = req.WhichOneof("msg")
                if kind == "heartbeat":
                    await core.heartbeat(session, req.heartbeat.draining, req.heartbeat.telemetry)
                elif kind == "accepted":
                    await core.accepted(session, req.accepted.lease_id)
                elif kind == "progress":
                    core.progress(session, req.progress)
                elif kind == "chunk":
                    core.chunk(session, req.chunk)
                elif kind == "result":
                    # Judged off the stream: heartbeats keep flowing while a
                    # large result is checked, and a miner hanging up right
                    # after sending cannot leave its job half-judged.
                    core.spawn(core.result(session, req.result))
                elif kind == "failure":
                    core.spawn(core.failure(session, req.failure))
                else:
                    log.warning("unexpected_miner_message", kind=kind)
        except (asyncio.CancelledError, AitbcError):
            raise
        except grpc.aio.AioRpcError:
            pass
        except Exception:
            log.exception("miner_stream_error")


def _token_check(tokens: TokenTable, token_sha256: str, admitted: Principal) -> Callable[[bool], AitbcError | None]:
    """Why a stream admitted under this token may no longer speak, if it may
    not: the token was revoked (or now names someone else) or expired."""

    def check(fresh: bool) -> AitbcError | None:
        now = tokens.lookup_hash(token_sha256, fresh=fresh)
        if now is None or (now.role, now.miner_id) != (admitted.role, admitted.miner_id):
            return Unauthenticated(
                f"the token of {admitted.name!r} was revoked: this stream is closed", reason="TOKEN_REVOKED"
            )
        if now.expired:
            return Unauthenticated(
                f"the token of {admitted.name!r} has expired: this stream is closed", reason="TOKEN_EXPIRED"
            )
        return None

    return check


def _check_names_miner(token_miner_id: str) -> None:
    """A miner token speaks for exactly the one miner id it names. One that
    names none is refused rather than trusted with any: it let one token
    register every id it liked, and lock each one's owner out with its key."""
    if not token_miner_id:
        raise PermissionDenied(
            "this miner token names no miner id: ask the operator for one issued with --miner-id",
            reason="NO_MINER_ID",
        )


def _check_hello_lists(hello: cpb.MinerHello) -> None:
    caps = hello.capabilities
    leases, models = list(hello.in_flight_lease_ids), [n for m in caps.models for n in (m.workload, m.name)]
    lists: list[tuple[str, int, int, list[str]]] = [
        ("hello.in_flight_lease_ids", len(leases), MAX_HELLO_LEASES, leases),
        ("hello.capabilities.workloads", len(caps.workloads), MAX_WORKLOADS, list(caps.workloads)),
        ("hello.capabilities.models", len(caps.models), MAX_MODELS, models),
    ]
    for field, count, most, names in lists:
        if count > most:
            raise InvalidArgument(f"{field} may list at most {most} entries, got {count}", field=field)
        if any(len(n) > MAX_NAME for n in names):
            raise InvalidArgument(f"{field} entries must be at most {MAX_NAME} characters each", field=field)


class CoordinatorAdminServicer(coordinator_pb2_grpc.CoordinatorAdminServiceServicer):
    def __init__(self, core: Coordinator) -> None:
        self._core = core

    async def ResetMinerKey(
        self, request: cpb.ResetMinerKeyRequest, context: grpc.aio.ServicerContext
    ) -> cpb.ResetMinerKeyResponse:
        caller = principal()
        if not request.miner_id or len(request.miner_id) > 128:
            raise InvalidArgument("miner_id is required (at most 128 characters)", field="miner_id")
        key = crypto.check_public_key(request.new_public_key, field="new_public_key")
        reason = request.reason.strip()
        if not reason or len(reason) > 500:
            raise InvalidArgument("reason is required (1..500 characters): it goes to the audit log", field="reason")
        if not 1 <= len(request.request_id) <= 128:
            raise InvalidArgument("request_id must be 1..128 characters; retries reuse it", field="request_id")
        structlog.contextvars.bind_contextvars(miner_id=request.miner_id)
        reset = await self._core.reset_miner_key(caller, request.miner_id, key, reason, request.request_id)
        return cpb.ResetMinerKeyResponse(old_public_key=reset.old_key, public_key=reset.new_key)
