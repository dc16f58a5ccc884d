"""The coordinator's core: intake, push dispatch, leases, results,
verification and the settlement outbox.

Nothing here polls for work: a submitted job, a joining miner and a freed
slot each wake the dispatcher, which pushes an assignment down the miner's
open stream at once. The store is the truth; in-memory state (sessions,
watchers) is rebuilt from it and from reconnecting miners.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import json
import math
import random
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import structlog

from aitbc import crypto
from aitbc.audit import audit
from aitbc.auth import Principal
from aitbc.dbfaults import StorageUnavailable
from aitbc.errors import (
    AitbcError,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from aitbc.signed import seal
from aitbc.timeutil import ts_from_datetime, ts_now
from aitbc.v1 import coordinator_pb2 as cpb
from aitbc.v1 import signing_pb2
from aitbc.wellformed import check_timestamp
from aitbc.workloads.base import Check
from aitbc.workloads.registry import MAX_SPEC_BYTES, WORKLOADS, policy_of, workload_of
from coordinator_svc import _metrics as M
from coordinator_svc import _store as st
from coordinator_svc._checks import CheckRunner, independent, pick_at_random
from coordinator_svc._leases import GONE, Lease, LeaseClock, LeaseRow
from coordinator_svc._retention import BATCH, DAY, BlobFiles
from coordinator_svc._store import JobRecord, JobStore
from coordinator_svc._verify import (
    ACCEPTED,
    BAD_OUTPUT,
    DISAGREED,
    PENDING,
    WITHDRAWN,
    check_result,
    unread_size_problem,
)
from coordinator_svc._wallet import WalletClient, WalletError

log = structlog.get_logger()
T = TypeVar("T")
HOLD_SWEEP_SECS = 10.0
# The longest an outbox item waits between tries (before jitter).
OUTBOX_MAX_DELAY = 30.0
# How often the bounds of ended leases are swept from the store.
BOUNDS_SWEEP_SECS = 60.0
# A slow link for a run-time bound: a result's upload at a megabyte a second.
UPLOAD_BYTES_PER_SEC = 1e6
# Progress shown to a job's watchers at most this often, cut to this length.
PROGRESS_INTERVAL = 0.25
MAX_PROGRESS_MESSAGE = 200
# Answers a miner may leave unread before it is sent no more answers it did
# not need; stale lease ids logged per stream, and echoed at most this long.
MAX_UNREAD = 64
LOGGED_STALE_LEASES = 16
LEASE_ID_ECHO = 64
# uait per run, and per unit: MFLOP (matmul), token (llm_gen), text (embed),
# kilopixel-step (sd_infer).
DEFAULT_PRICES = {"matmul": (1000, 1), "llm_gen": (1000, 10), "embed": (500, 100), "sd_infer": (2000, 1)}


def parse_prices(text: str) -> dict[str, tuple[int, int]]:
    """ "workload=base+per_unit,…" over the defaults, e.g. "llm_gen=500+5"."""
    prices = dict(DEFAULT_PRICES)
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        name, _, value = entry.partition("=")
        base, plus, per_unit = value.partition("+")
        if name.strip() not in WORKLOADS or not plus or not base.strip().isdigit() or not per_unit.strip().isdigit():
            raise ValueError(f"PRICES entry {entry!r} is not workload=base+per_unit with a known workload")
        prices[name.strip()] = (int(base), int(per_unit))
    return prices


@dataclass
class Run:
    """One miner's result for a job that needs several agreeing runs."""

    miner_id: str
    payout_address: str
    lease_id: str
    output_sha256: str  # hex
    receipt: str  # hex of the Signed receipt
    usage: str  # hex of Usage
    nonce: str  # hex of the receipt's nonce: a copied receipt repeats it
    verdict: str
    detail: str = ""
    reputation: float = 0.0
    # The miner's operator where its token names one (see _checks.operator_of).
    operator: str = ""
    # Runs whose outputs agree share a group; two groups among the pending
    # runs are a disagreement, and every run after it is a referee's.
    group: int = 0
    referee: bool = False
    # Epoch seconds the result was judged: a disagreement waits for a
    # referee at most REFEREE_WAIT_SECS from its latest run.
    returned_at: float = 0.0


def load_runs(rec: JobRecord) -> list[Run]:
    return [Run(**r) for r in json.loads(rec.runs or "[]")]


def dump_runs(runs: list[Run]) -> str:
    return json.dumps([dataclasses.asdict(r) for r in runs])


@dataclass(frozen=True)
class Settings:
    network_id: str
    heartbeat_secs: float = 5.0
    lease_secs: float = 30.0
    max_attempts: int = 3
    fee_bps: int = 500
    # Price table, per workload: (uait per run, uait per unit of the
    # workload's own measure of the work; see each workload's `unit`).
    prices: dict[str, tuple[int, int]] = field(default_factory=lambda: dict(DEFAULT_PRICES))
    # A miner whose results were refused this many times is banned.
    ban_after: int = 3
    # A job's run-time bound on a miner: this many times the workload's
    # estimate for a slow device of the miner's kind (CPU or GPU), and never
    # under the floor. Past it without a result the job is taken back,
    # however the miner heartbeats.
    run_bound_factor: float = 3.0
    run_bound_floor_secs: float = 300.0
    # Largest output a job may return: its upload lands on disk and its
    # check reads it whole, so this bounds both per job.
    max_result_bytes: int = 64 * 2**20
    # What the output checks in flight may hold together, and the threads
    # they run on (see _checks).
    check_memory_bytes: int = 128 * 2**20
    check_threads: int = 2
    # How long a disagreement waits for an independent referee before the
    # job ends refunded, nobody paid or penalised.
    referee_wait_secs: float = 600.0
    # A miner whose stream ends keeps its leases this long: one that
    # reconnects within it (its hello lists them) delivers their results.
    reconnect_grace_secs: float = 30.0
    # A result is kept this long after its job ended, the job's row this
    # long (0: for ever); the sweep runs this often (see _retention).
    result_retention_days: float = 7.0
    job_retention_days: float = 30.0
    retention_sweep_secs: float = 60.0


@dataclass
class Upload:
    path: Path
    limit: int
    size: int = 0
    sha: Any = field(default_factory=hashlib.sha256)


@dataclass
class MinerSession:
    miner_id: str
    public_key: bytes
    payout_address: str
    workloads: frozenset[str]
    slots: int
    gpu: bool
    max_vram: int
    # Who runs it, where its token's name says (see _checks.operator_of).
    operator: str = ""
    # "workload/name" of each model it holds.
    models: frozenset[str] = frozenset()
    # Assignments it queues beyond its slots, preparing them meanwhile.
    prefetch: int = 0
    # lease id -> when its run-time bound passes (time.monotonic()).
    run_deadlines: dict[str, float] = field(default_factory=dict)
    session_id: str = field(default_factory=lambda: "sess_" + secrets.token_hex(8))
    outbox: asyncio.Queue[cpb.ConnectResponse | None] = field(default_factory=asyncio.Queue)
    # lease id -> (job id, output size limit)
    leases: dict[str, tuple[str, int]] = field(default_factory=dict)
    uploads: dict[str, Upload] = field(default_factory=dict)
    connected_at: float = field(default_factory=time.monotonic)
    # When its leases' deadline was last written to the store (monotonic).
    leases_stored_at: float = 0.0
    # False from a lapsed lease until the next heartbeat: a miner that went
    # quiet (paused, wedged) gets no new work while it is quiet.
    healthy: bool = True
    # The sidecar is shutting down: it finishes its jobs but takes no more.
    draining: bool = False
    # The latest GPU telemetry from its heartbeats.
    telemetry: list[Any] = field(default_factory=list)
    # The indexes of the GPUs its hello declared: telemetry for others is
    # dropped (counted here), so its metric labels are bounded by its hello.
    gpus: frozenset[int] = frozenset()
    undeclared_telemetry: int = 0
    # Messages naming a lease it does not hold (logged only the first few).
    stale_leases: int = 0
    # 0..1 from its record of accepted and refused results (see reputation()).
    reputation: float = 0.5
    # The sidecar's release as a bounded metric label (see _metrics.version_label).
    version: str = "unknown"
    # Why the coordinator ends this stream, told to the miner as its status.
    closed_by: AitbcError | None = None
    # Why the token that opened the stream no longer speaks for it (revoked,
    # expired), or None while it does; True looks at the tokens file now.
    token_check: Callable[[bool], AitbcError | None] | None = None
    # Set once its hello's leases are reconciled (miner_joined): a job
    # assigned before that was taken for one it came back without.
    joined: bool = False

    @property
    def accepts_work(self) -> bool:
        return self.joined and self.healthy and not self.draining

    @property
    def free_slots(self) -> int:
        """Assignments it can take now: idle slots plus its prefetch queue."""
        return max(0, self.slots + self.prefetch - len(self.leases))

    @property
    def idle(self) -> bool:
        return len(self.leases) < self.slots

    def can_run(self, workload: str, model: str, req: cpb.Requirements) -> bool:
        if workload not in self.workloads:
            return False
        if model and f"{workload}/{model}" not in self.models:
            return False
        if req.gpu_required and not self.gpu:
            return False
        return req.min_vram_bytes <= self.max_vram if req.min_vram_bytes else True


def reputation(accepted: int, refused: int) -> float:
    """Laplace-smoothed share of good results, where one refused result
    weighs as much as ten accepted ones: a new miner starts at 0.5, a
    cheater sinks fast and climbs back slowly."""
    return (accepted + 1) / (accepted + 1 + 10 * refused + 1)


def why_unplaceable(workload: str, model: str, req: cpb.Requirements, sessions: list[MinerSession]) -> str:
    if not sessions:
        return "no miner is connected (other than any this job already ran on)"
    if not any(workload in s.workloads for s in sessions):
        return f"no connected miner runs {workload}"
    if model and not any(f"{workload}/{model}" in s.models for s in sessions):
        return f"no connected miner holds {workload} model {model!r}"
    if req.gpu_required and not any(s.gpu for s in sessions):
        return "no connected miner has a GPU"
    if req.min_vram_bytes:
        return f"no connected miner has {req.min_vram_bytes / 2**30:.1f} GiB of VRAM"
    return "no connected miner meets the requirements"


class WatchSlot:
    """The newest snapshot of a job that one watcher has not taken yet. A
    watcher that reads slowly, or not at all, holds this one record however
    many changes it misses (a queue held every one: hundreds of MiB under a
    progress flood), and sees the latest when it reads again. The job's end
    is never replaced by an older snapshot."""

    def __init__(self) -> None:
        self._rec: JobRecord | None = None
        self._ready = asyncio.Event()

    def offer(self, rec: JobRecord) -> None:
        held = self._rec
        if held is not None and not _supersedes(rec, held):
            return
        self._rec = rec
        self._ready.set()

    async def take(self) -> JobRecord:
        while self._rec is None:
            self._ready.clear()
            await self._ready.wait()
        rec, self._rec = self._rec, None
        return rec


def _supersedes(rec: JobRecord, held: JobRecord) -> bool:
    """Whether `rec` may replace `held` in a slot. Snapshots can arrive out
    of order (a re-read that started before a transition lands after it);
    the store's version orders them, not update_time, which is the wall
    clock's and steps with it."""
    if (rec.state in st.TERMINAL) != (held.state in st.TERMINAL):
        return rec.state in st.TERMINAL
    # Equal versions: the same state re-read to show newer progress.
    return rec.version >= held.version


class WatchHub:
    def __init__(self) -> None:
        self._subs: dict[str, set[WatchSlot]] = {}

    def publish(self, rec: JobRecord) -> None:
        for slot in self._subs.get(rec.job_id, ()):
            slot.offer(rec)

    def watching(self, job_id: str) -> bool:
        return job_id in self._subs

    def watched(self) -> list[str]:
        return list(self._subs)

    def subscribe(self, job_id: str) -> WatchSlot:
        slot = WatchSlot()
        self._subs.setdefault(job_id, set()).add(slot)
        return slot

    def unsubscribe(self, job_id: str, slot: WatchSlot) -> None:
        subs = self._subs.get(job_id)
        if subs is not None:
            subs.discard(slot)
            if not subs:
                del self._subs[job_id]


class Coordinator:
    def __init__(
        self,
        *,
        store: JobStore,
        wallet: WalletClient,
        key: crypto.KeyPair,
        settings: Settings,
        blobs_dir: Path,
        miner_token_live: Callable[[str], bool] = lambda miner_id: True,
    ) -> None:
        # Whether a live token still speaks for a miner id (TokenTable).
        self.miner_token_live = miner_token_live
        self.store = store
        self.wallet = wallet
        self.key = key
        self.settings = settings
        self.blobs = Path(blobs_dir)
        self.blob_files = BlobFiles(self.blobs)
        (self.blobs / "incoming").mkdir(parents=True, exist_ok=True)
        self.watch_hub = WatchHub()
        self.sessions: dict[str, MinerSession] = {}
        self._db_exec = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jobstore")
        # Every live lease's deadlines, on the monotonic clock (see _leases).
        self.leases = LeaseClock(settings.lease_secs, settings.reconnect_grace_secs)
        # (job id, kind) -> when its next try is due (time.monotonic()), for
        # the outbox items this process scheduled.
        self._outbox_due: dict[tuple[str, str], float] = {}
        # job id -> since when (time.monotonic()) its hold has been seen
        # unconfirmed, for the hold loop.
        self._holding_since: dict[str, float] = {}
        self.checks = CheckRunner(settings.check_memory_bytes, settings.check_threads)
        # job id -> when its wait for a referee ends (time.monotonic()).
        self._referee_due: dict[str, float] = {}
        self._wake = asyncio.Event()
        self._outbox_wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._last_bounds_sweep = time.monotonic()
        self._inflight: set[asyncio.Task[None]] = set()
        # job id -> (fraction, message) of running jobs whose miner is here.
        self.progress_of: dict[str, tuple[float, str]] = {}
        # Jobs whose progress is due to be shown to their watchers.
        self._progress_due: set[str] = set()
        # job id -> when it (last) became QUEUED here, for dispatch latency.
        self._queued_at: dict[str, float] = {}
        store.on_transition = self._count_transition
        M.MINERS.set_function(lambda: len(self.sessions))
        M.FREE_SLOTS.set_function(lambda: sum(s.free_slots for s in list(self.sessions.values()) if s.accepts_work))

    def _count_transition(self, workload: str, state: str) -> None:
        """On the store's thread, after each committed state change."""
        M.JOB_TRANSITIONS.labels(workload, state).inc()

    async def db(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a store call on the store's one thread: commits fsync, and the
        event loop must not wait on the disk."""
        return await asyncio.get_running_loop().run_in_executor(self._db_exec, partial(fn, *args, **kwargs))

    async def _until_stored(self, write: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """A write that must land however long the database is away: the
        store gives up after a while (aitbc.pg) so that its one thread and
        the callers of RPCs are not held; this waits on, off that thread."""
        delay = 0.5
        while True:
            try:
                return await write()
            except StorageUnavailable:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    # -- lifecycle --------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()

        def on_change(job_id: str, state: str) -> None:  # on the listener's thread
            loop.call_soon_threadsafe(self._changed_elsewhere, job_id, state)

        def on_miner_key(miner_id: str) -> None:  # on the listener's thread
            loop.call_soon_threadsafe(lambda: self.spawn(self.check_miner_key(miner_id)))

        def on_resync() -> None:  # on the listener's thread
            loop.call_soon_threadsafe(self._resync)

        self.store.listen(on_change, on_miner_key, on_resync)
        await self._recover()
        loops = (
            self._dispatch_loop(),
            self._lease_loop(),
            self._outbox_loop(),
            self._hold_loop(),
            self._retention_loop(),
        )
        for coro in loops:
            self._tasks.append(asyncio.create_task(coro))
        self.wake()

    def disconnect_all(self) -> None:
        """Close every miner stream for shutdown. Their leases stand: the
        miners reconnect to the restarted coordinator and deliver."""
        self._stopping = True
        for s in list(self.sessions.values()):
            s.outbox.put_nowait(None)

    async def stop(self) -> None:
        self.disconnect_all()
        for t in [*self._tasks, *self._inflight]:
            t.cancel()
        for t in [*self._tasks, *self._inflight]:
            with suppress(asyncio.CancelledError):
                await t
        self._db_exec.shutdown(wait=True)
        self.checks.shutdown()

    async def _recover(self) -> None:
        """Resume every job from its persisted state after a restart. Nothing
        here asks the wallet: a coordinator must start, serve reads and take
        miners while the wallet is away. Holds it never confirmed are the
        hold loop's, first thing."""
        for rec in await self.db(self.store.in_states, [st.HOLDING]):
            self._holding_since[rec.job_id] = -math.inf
        # A result that was being checked when we died is gone with the
        # process: hand the job out again.
        for rec in await self.db(self.store.in_states, [st.VERIFYING]):
            await self._retry_or_fail(rec, [st.VERIFYING], "coordinator restarted while verifying")
        # Leased jobs keep their leases, renewed in full: their miners could
        # not heartbeat while we were down, and may reconnect and deliver.
        # If they do not, the lease lapses and the lease loop requeues them.
        renewed = await self.db(self.store.renew_leases, time.time() + self.settings.lease_secs)
        if renewed:
            log.info("leases_renewed_after_restart", count=renewed)

    def wake(self) -> None:
        self._wake.set()

    def _changed_elsewhere(self, job_id: str, state: str) -> None:
        """A job changed, maybe in another replica: wake the dispatcher for
        queued work, the outbox for endings, and this replica's watchers."""
        if state == st.QUEUED:
            self.wake()
        elif state in (st.SETTLING, st.FAILED, st.CANCELLED, st.EXPIRED):
            self._outbox_wake.set()
        if self.watch_hub.watching(job_id):
            self.spawn(self._republish(job_id))

    def _resync(self) -> None:
        """The listener (re)connected: what changed while it was away was
        announced to no one here. Act as if everything changed: queued
        work, endings, every watched job, every connected miner's key."""
        self.wake()
        self._outbox_wake.set()
        for job_id in self.watch_hub.watched():
            self.spawn(self._republish(job_id))
        for miner_id in list(self.sessions):
            self.spawn(self.check_miner_key(miner_id))

    async def _republish(self, job_id: str) -> None:
        rec = await self.db(self.store.get, job_id)
        if rec is not None:
            self.watch_hub.publish(rec)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run work that must finish even if the stream that asked for it
        closes (a result being judged): such work is cancelled only when the
        coordinator stops."""
        task = asyncio.create_task(coro)
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    def _publish(self, rec: JobRecord | None) -> None:
        if rec is None:
            return
        if rec.state != st.RUNNING:
            self.progress_of.pop(rec.job_id, None)
        if rec.state == st.QUEUED:
            self._queued_at.setdefault(rec.job_id, time.monotonic())
        elif rec.state in st.TERMINAL:
            self._queued_at.pop(rec.job_id, None)
        if rec.state == st.SETTLED:
            M.E2E_SECONDS.labels(rec.workload).observe(
                max(0.0, time.time() - datetime.fromisoformat(rec.create_time).timestamp())
            )
        log.info(
            "job_state",
            job_id=rec.job_id,
            state=rec.state,
            miner_id=rec.miner_id or None,
            attempts=rec.attempts,
            detail=rec.status_detail or None,
        )
        self.watch_hub.publish(rec)

    # -- client side ------------------------------------------------------

    def price_of(self, workload: str, units: int) -> int:
        """The price of one run, from our table and our own measure."""
        if workload not in self.settings.prices:
            raise InvalidArgument(f"no price for workload {workload}", field="spec.workload")
        base, per_unit = self.settings.prices[workload]
        return base + units * per_unit

    async def submit(self, caller: Principal, spec: cpb.JobSpec, request_id: str) -> JobRecord:
        if not request_id:
            raise InvalidArgument("request_id is required: any unique string; retries reuse it", field="request_id")
        if len(request_id) > 128:
            raise InvalidArgument("request_id is longer than 128 characters", field="request_id")
        # The gate drops unknown fields from every request; this keeps them
        # out of the store whoever calls, since the stored spec is what every
        # dispatch pass reads and every miner gets.
        spec.DiscardUnknownFields()
        if spec.ByteSize() > MAX_SPEC_BYTES:
            raise InvalidArgument(
                f"the spec is {spec.ByteSize()} bytes, above the {MAX_SPEC_BYTES} a job may carry",
                field="spec",
                reason="SPEC_TOO_LARGE",
            )
        workload, params = workload_of(spec)
        size = workload.max_output_size(params)
        if size > self.settings.max_result_bytes:
            raise InvalidArgument(
                f"this {workload.name} job's output would be up to {size} bytes; this coordinator takes at most "
                f"{self.settings.max_result_bytes} (its MAX_RESULT_BYTES)",
                field=workload.size_field,
                reason="RESULT_TOO_LARGE",
            )
        if spec.max_price <= 0:
            raise InvalidArgument("max_price must be positive (uait)", field="spec.max_price", reason="BAD_AMOUNT")
        policy = policy_of(workload, spec)
        # Each run a policy needs is paid for: the client sees it here.
        price = policy.runs * self.price_of(workload.name, workload.work_units(params))
        if price > spec.max_price:
            raise FailedPrecondition(
                f"the job costs {price} uait ({policy.runs} run(s)), above max_price {spec.max_price}",
                reason="PRICE_ABOVE_MAX",
                metadata={"price": str(price)},
            )
        spec_bytes = spec.SerializeToString(deterministic=True)
        prior = await self.db(self.store.get_by_request, caller.name, request_id)
        if prior is not None:
            prior = self._same_request(prior, spec_bytes)
            # A retry after the wallet was unreachable finishes what the
            # first attempt started.
            return await self._confirm_hold(prior) if prior.state == st.HOLDING else prior
        deadline = 0.0
        if spec.HasField("deadline_time"):
            check_timestamp(spec.deadline_time, "spec.deadline_time")
            deadline = spec.deadline_time.ToNanoseconds() / 1e9
            if deadline <= time.time():
                raise InvalidArgument("deadline_time is in the past", field="spec.deadline_time")
        now = st.now_iso()
        rec = JobRecord(
            job_id=f"job_{int(time.time() * 1000):x}{secrets.token_hex(4)}",
            client_name=caller.name,
            client_address=caller.address,
            request_id=request_id,
            spec=spec_bytes,
            spec_sha256=crypto.sha256(spec_bytes),
            workload=workload.name,
            state=st.HOLDING,
            attempts=0,
            miner_id="",
            lease_id="",
            lease_deadline=0.0,
            max_price=spec.max_price,
            price=price,
            miner_amount=0,
            fee_amount=0,
            status_detail="",
            verdict="",
            output_sha256=b"",
            usage=b"",
            receipt=b"",
            settlement=b"",
            hold_state="NONE",
            refused_miners="",
            deadline=deadline,
            create_time=now,
            update_time=now,
            runs_needed=policy.runs,
            verification=policy.message.SerializeToString(deterministic=True),
        )
        stored = await self.db(self.store.insert, rec)
        if stored.job_id != rec.job_id:  # a concurrent retry won the insert
            return self._same_request(stored, spec_bytes)
        return await self._confirm_hold(stored)

    @staticmethod
    def _same_request(prior: JobRecord, spec_bytes: bytes) -> JobRecord:
        if prior.spec != spec_bytes:
            raise AlreadyExists(
                "request_id was already used for a different job", field="request_id", reason="REQUEST_ID_REUSED"
            )
        return prior

    async def _confirm_hold(self, rec: JobRecord) -> JobRecord:
        try:
            await self.wallet.place_hold(rec.job_id, rec.client_address, rec.max_price)
        except WalletError as err:
            if err.code.name in ("FAILED_PRECONDITION", "INVALID_ARGUMENT", "ALREADY_EXISTS"):
                # Definitely refused: forget the job so a retry after funding
                # starts clean.
                await self.db(self.store.delete, rec.job_id, st.HOLDING)
                log.info("job_refused", job_id=rec.job_id, reason=err.reason)
            raise err.to_domain() from None
        queued = await self.db(
            self.store.transition, rec.job_id, from_states=[st.HOLDING], state=st.QUEUED, hold_state="HELD"
        )
        if queued is None:
            current = await self.db(self.store.get, rec.job_id)
            assert current is not None
            return current
        self._publish(queued)
        self.wake()
        return queued

    async def get(self, caller: Principal, job_id: str) -> JobRecord:
        rec = await self.db(self.store.get, job_id) if job_id else None
        # Another client's job is NOT_FOUND, so ids do not leak existence.
        if rec is None or rec.client_name != caller.name:
            raise NotFound(f"job {job_id!r} not found", field="job_id", reason="JOB_NOT_FOUND")
        return rec

    async def cancel(self, caller: Principal, job_id: str) -> JobRecord:
        rec = await self.get(caller, job_id)
        if rec.state == st.CANCELLED:
            return rec
        if rec.state == st.HOLDING:
            raise FailedPrecondition("the job's hold is still being placed; retry in a moment", reason="JOB_NOT_READY")
        cancellable = [st.QUEUED, *st.LEASED]
        if rec.state not in cancellable:
            raise FailedPrecondition(
                f"the job is {rec.state.lower()}: too late to cancel", reason="NOT_CANCELLABLE",
                metadata={"state": rec.state},
            )  # fmt: skip
        new = await self._end(rec, cancellable, st.CANCELLED, "cancelled by the client")
        if new is None:  # it moved on meanwhile: say where it is
            return await self.get(caller, job_id)
        return new

    async def _end(self, rec: JobRecord, from_states: list[str], state: str, why: str) -> JobRecord | None:
        """End an unverified job for good: tell its miner to stop, refund."""
        new = await self.db(
            self.store.transition, rec.job_id, from_states=from_states, state=state, lease_id="",
            status_detail=why, outbox=("release", why.encode()),
        )  # fmt: skip
        if new is None:
            return None
        session = self.sessions.get(rec.miner_id)
        held = session.leases.pop(rec.lease_id, None) if session is not None and rec.state in st.LEASED else None
        if session is not None and held is not None:
            session.outbox.put_nowait(
                cpb.ConnectResponse(cancel=cpb.CancelAssignment(lease_id=rec.lease_id, reason=why))
            )
            self.wake()
        self._outbox_wake.set()
        self._publish(new)
        return new

    async def list_jobs(
        self, caller: Principal, states: list[str], page_size: int, page_token: str
    ) -> tuple[list[JobRecord], str]:
        if page_size < 0:
            raise InvalidArgument("page_size must not be negative", field="page_size")
        size = min(page_size or 50, 500)
        before = _parse_job_token(page_token)
        rows = await self.db(self.store.list_for_client, caller.name, states, before, size + 1)
        page = rows[:size]
        token = _job_token(page[-1]) if len(rows) > size else ""
        return page, token

    async def result_chunks(self, caller: Principal, job_id: str) -> AsyncIterator[tuple[int, bytes, int, bytes]]:
        """(offset, data, total size, sha256) of a verified output, checked
        against its digest as it is read."""
        rec = await self.get(caller, job_id)
        if rec.state not in (st.SETTLING, st.SETTLED) or not rec.output_sha256:
            raise FailedPrecondition(
                f"the job is {rec.state.lower()}: it has no verified result", reason="NO_RESULT",
                metadata={"state": rec.state},
            )  # fmt: skip
        if rec.result_expired:
            raise FailedPrecondition(
                f"the job's result was deleted {self.settings.result_retention_days:g} day(s) after the job ended "
                "(this coordinator's RESULT_RETENTION_DAYS)", reason="RESULT_EXPIRED",
            )  # fmt: skip
        path = self.blobs / rec.output_sha256.hex()
        if not path.exists():
            raise FailedPrecondition("the job's result is no longer stored", reason="RESULT_GONE")
        total = path.stat().st_size
        digest = hashlib.sha256()
        offset = 0
        with path.open("rb") as f:
            while True:
                data = await asyncio.to_thread(f.read, 1024 * 1024)
                if not data:
                    break
                digest.update(data)
                yield offset, data, total, rec.output_sha256
                offset += len(data)
        if digest.digest() != rec.output_sha256:
            log.error("result_blob_corrupt", job_id=job_id)
            raise FailedPrecondition("the stored result does not match its digest", reason="RESULT_CORRUPT")

    async def watch(self, caller: Principal, job_id: str) -> AsyncIterator[JobRecord]:
        await self.get(caller, job_id)
        slot = self.watch_hub.subscribe(job_id)
        try:
            rec = await self.get(caller, job_id)
            last = rec.version
            shown = self.progress_of.get(job_id)
            yield rec
            while rec.state not in st.TERMINAL:
                rec = await slot.take()
                progress = self.progress_of.get(job_id)
                if rec.version < last or (rec.version == last and progress == shown):
                    continue  # stale, or nothing new to show
                last, shown = rec.version, progress
                yield rec
        finally:
            self.watch_hub.unsubscribe(job_id, slot)

    # -- dispatch ---------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._dispatch()
            except Exception:
                log.exception("dispatch_error")

    async def _dispatch(self) -> None:
        queued = await self.db(self.store.in_states, [st.QUEUED], 500)
        for rec in queued:
            sessions = list(self.sessions.values())
            try:
                model, req = _placement(rec)
            except AitbcError as exc:
                # Valid when submitted, refused by this build's rules: end it
                # rather than let it stall the queue behind it.
                await self._end(rec, [st.QUEUED], st.FAILED, f"the job is no longer valid: {exc.message}")
                continue
            refused = set(rec.refused_miners.split())
            eligible = [s for s in sessions if s.accepts_work and s.miner_id not in refused]
            # Runs of one job go to miners independent of its earlier runs:
            # one payout address or operator agreeing with itself proves nothing.
            runs = load_runs(rec) if rec.runs_needed > 1 else []
            eligible = [s for s in eligible if independent(s, runs)]
            capable = [s for s in eligible if s.can_run(rec.workload, model, req)]
            free = [s for s in capable if s.free_slots > 0]
            waiting_since = _dispute_since(runs)
            if not free:
                detail = (
                    f"waiting for a free slot on {len(capable)} capable miner(s)"
                    if capable
                    else why_unplaceable(rec.workload, model, req, [s for s in sessions if s.miner_id not in refused])
                )
                if waiting_since is not None:
                    if await self._unrefereed(rec, waiting_since):
                        continue
                    detail = (
                        "runs disagree: waiting for a referee, a miner with another payout address and operator "
                        f"than every run so far ({detail})"
                    )
                if detail != rec.status_detail:
                    self._publish(
                        await self.db(self.store.transition, rec.job_id, from_states=[st.QUEUED], status_detail=detail)
                    )
                if not any(s.free_slots for s in sessions):
                    return
                continue
            self._referee_due.pop(rec.job_id, None)
            if rec.runs_needed > 1:
                # Each run of a job that needs several, the referee's above
                # all, goes to a miner drawn at random: colluding identities
                # land on one job together only as often as chance puts
                # them there (SECURITY.md), whatever their load, uptime or
                # reputation. Idle slots still come first.
                session = pick_at_random([s for s in free if s.idle] or free)
            else:
                # Policy: a miner with an idle slot before one that would only
                # queue the job; then best reputation, least loaded, and the
                # longest connected (stable miners).
                session = min(
                    free,
                    key=lambda s: (not s.idle, -s.reputation, len(s.leases) / (s.slots + s.prefetch), s.connected_at),
                )
            await self._assign(session, rec)

    async def _unrefereed(self, rec: JobRecord, since: float) -> bool:
        """End a queued job whose runs disagree once no referee has run for
        REFEREE_WAIT_SECS since: without one nothing says who was right, so
        nobody is paid or judged and the client is refunded. Until then,
        note when to look again; True if it ended."""
        wait = self.settings.referee_wait_secs
        due = self._referee_due.get(rec.job_id)
        if due is None:
            # First seen here (after a restart, or another replica judged the
            # run): `since` is a wall-clock time, so what is left of the wait
            # is clamped to [0, wait], and from then on the monotonic clock
            # counts it, as every wait in the coordinator (README, Clocks).
            due = time.monotonic() + min(max(since + wait - time.time(), 0.0), wait)
        if time.monotonic() < due:
            self._referee_due[rec.job_id] = due
            return False
        self._referee_due.pop(rec.job_id, None)
        await self._end(
            rec, [st.QUEUED], st.FAILED,
            f"no independent referee ran within {self.settings.referee_wait_secs:g} s of the disagreement: "
            "refunded in full; nobody paid or penalised",
        )  # fmt: skip
        return True

    async def _assign(self, session: MinerSession, rec: JobRecord) -> None:
        workload, params = workload_of(cpb.JobSpec.FromString(rec.spec))
        lease_id = "lease_" + secrets.token_hex(8)
        run_due = self._run_deadline(session, lease_id, workload, params)
        session.leases[lease_id] = (rec.job_id, workload.max_output_size(params))
        # Stored (and shown to the miner) as wall-clock times; this process
        # times the lease on its monotonic clock (self.leases).
        deadline = time.time() + self.settings.lease_secs
        assigned = await self.db(
            self.store.transition,
            rec.job_id,
            from_states=[st.QUEUED],
            state=st.ASSIGNED,
            miner_id=session.miner_id,
            lease_id=lease_id,
            lease_deadline=deadline,
            attempts=rec.attempts + 1,
            status_detail="",
            run_deadline=self.leases.to_wall(run_due),
        )
        if assigned is None or self.sessions.get(session.miner_id) is not session:
            session.leases.pop(lease_id, None)
            if assigned is not None:  # the miner left while we committed
                await self._retry_or_fail(assigned, st.LEASED, "miner disconnected", expect_lease=lease_id)
            return
        self.leases.assigned(lease_id, rec.job_id, session.miner_id, run_due, deadline)
        self._publish(assigned)
        queued_at = self._queued_at.pop(rec.job_id, None)
        if queued_at is not None:
            M.DISPATCH_SECONDS.labels(rec.workload).observe(time.monotonic() - queued_at)
        session.outbox.put_nowait(
            cpb.ConnectResponse(
                assignment=cpb.Assignment(
                    job_id=rec.job_id,
                    lease_id=lease_id,
                    job_spec=rec.spec,
                    lease_deadline_time=ts_from_datetime(_utc(deadline)),
                )
            )
        )

    def run_bound(self, workload: Any, params: Any, gpu: bool) -> float:
        """Seconds a run of the job may take on a CPU or GPU miner before the
        job is taken back: a multiple of the workload's estimate for a slow
        device plus its upload on a slow link, never under the floor."""
        estimate = workload.run_seconds(params, gpu) + workload.max_output_size(params) / UPLOAD_BYTES_PER_SEC
        return max(self.settings.run_bound_floor_secs, self.settings.run_bound_factor * estimate)

    def _run_deadline(self, session: MinerSession, lease_id: str, workload: Any, params: Any) -> float:
        """When the new lease's run-time bound passes (monotonic)."""
        now = self.leases.now()
        for held in [x for x in session.run_deadlines if x not in session.leases]:
            del session.run_deadlines[held]
        # Taken beyond its idle slots (prefetch), the job starts only when
        # those ahead of it end: it may wait as long as they may run.
        ahead = 0.0 if session.idle else sum(max(0.0, d - now) for d in session.run_deadlines.values())
        deadline = session.run_deadlines[lease_id] = now + ahead + self.run_bound(workload, params, session.gpu)
        return deadline

    async def _take_back(self, rec: JobRecord) -> None:
        """A lease past its run-time bound: heartbeats kept the miner's
        connection, not its job. The job goes to another miner, and this one
        pays in reputation as for a refused result (banned only as often)."""
        why = f"no result from {rec.miner_id} within the job's run-time bound"
        session = self.sessions.get(rec.miner_id)
        if session is not None and session.leases.pop(rec.lease_id, None) is not None:
            up = session.uploads.pop(rec.lease_id, None)
            if up:
                up.path.unlink(missing_ok=True)
            session.outbox.put_nowait(cpb.ConnectResponse(cancel=cpb.CancelAssignment(lease_id=rec.lease_id,
                                                                                      reason=why)))  # fmt: skip
        new = await self._retry_or_fail(
            rec, st.LEASED, why, expect_lease=rec.lease_id, refused_miners=_excluding(rec, rec.miner_id)
        )
        if new is None:
            return  # its result came first, or another replica took it back
        _, banned = await self._judge_miner(rec.miner_id, False)
        log.warning("run_bound_passed", job_id=rec.job_id, miner_id=rec.miner_id, lease_id=rec.lease_id,
                    banned=banned)  # fmt: skip
        if banned and session is not None:
            _close_banned(session)

    async def _retry_or_fail(
        self,
        rec: JobRecord,
        from_states: Any,
        reason: str,
        *,
        expect_lease: str | None = None,
        verdict: str = "",
        refused_miners: str | None = None,
        runs: str | None = None,
        requeue_detail: bool = False,
    ) -> JobRecord | None:
        # A job that needs k agreeing runs may fail max_attempts times
        # besides its k good ones, and once its runs disagree, once more
        # for a referee.
        disputed = _dispute_since(load_runs(rec) if runs is None else [Run(**r) for r in json.loads(runs)])
        failed = rec.attempts >= self.settings.max_attempts + rec.runs_needed - 1 + (disputed is not None)
        if failed:
            changes: dict[str, Any] = {
                "state": st.FAILED,
                "status_detail": f"failed after {rec.attempts} attempt(s): {reason}",
                "outbox": ("release", reason.encode()),
            }
        else:
            detail = reason if requeue_detail else f"requeued: {reason}"
            changes = {"state": st.QUEUED, "lease_deadline": 0.0, "status_detail": detail}
        if verdict:
            changes["verdict"] = verdict
        if refused_miners is not None:
            changes["refused_miners"] = refused_miners
        if runs is not None:
            changes["runs"] = runs
        new = await self.db(
            self.store.transition,
            rec.job_id,
            from_states=from_states,
            expect_lease=expect_lease,
            lease_id="",
            **changes,
        )
        if failed:
            self._outbox_wake.set()
        else:
            self.wake()
        self._publish(new)
        return new

    # -- miner side -------------------------------------------------------

    async def miner_joined(self, session: MinerSession, in_flight: frozenset[str] = frozenset()) -> None:
        old = self.sessions.get(session.miner_id)
        if old is not None:
            # The newest stream wins; the old one is told to go away.
            old.outbox.put_nowait(None)
        self.sessions[session.miner_id] = session
        # Read again now that the session is listed: a reset committed after
        # the hello was checked either finds the session or is seen here.
        if await self._stale_key(session):
            self._close_stale(session)
            return
        # Leases the miner held before (a reconnect): keep them on the new
        # session so its results are accepted.
        held = await self.db(self.store.leased_by, session.miner_id)
        bounds = await self.db(self.store.run_deadlines, [r.lease_id for r in held if r.lease_id in in_flight])
        for rec in held:
            if rec.lease_id in in_flight:
                workload, params = workload_of(cpb.JobSpec.FromString(rec.spec))
                session.leases[rec.lease_id] = (rec.job_id, workload.max_output_size(params))
                session.run_deadlines[rec.lease_id] = self.leases.held(
                    rec.lease_id, rec.job_id, rec.miner_id, bounds.get(rec.lease_id, 0.0), rec.lease_deadline
                )
            else:
                # The miner came back without it (restarted, lost it): no
                # need to wait for the lease to lapse.
                await self._retry_or_fail(
                    rec, st.LEASED, "miner reconnected without the job", expect_lease=rec.lease_id
                )
        for lease_id in in_flight - set(session.leases):
            session.outbox.put_nowait(
                cpb.ConnectResponse(cancel=cpb.CancelAssignment(lease_id=lease_id, reason="lease no longer valid"))
            )
        log.info(
            "miner_joined",
            miner_id=session.miner_id,
            slots=session.slots,
            gpu=session.gpu,
            workloads=sorted(session.workloads),
            version=session.version,
        )
        session.joined = True
        self.wake()

    async def check_miner_key(self, miner_id: str) -> None:
        """Close this replica's stream of the miner if its key is no longer
        the registered one (reset or rotated, here or on another replica)."""
        session = self.sessions.get(miner_id)
        if session is not None and await self._stale_key(session):
            self._close_stale(session)

    async def _stale_key(self, session: MinerSession) -> bool:
        if session.closed_by is not None:
            return True
        return await self.db(self.store.miner_key, session.miner_id) != session.public_key

    def _close_stale(self, session: MinerSession) -> None:
        """End the stream with KEY_MISMATCH; its leases are requeued as it
        leaves (miner_left)."""
        if session.closed_by is not None:
            return
        audit("miner_stream_closed_stale_key", miner_id=session.miner_id, key=session.public_key.hex())
        session.draining = True  # no new work while the stream winds down
        session.closed_by = PermissionDenied(
            f"miner {session.miner_id!r} is registered with another key now: this stream's key was replaced",
            reason="KEY_MISMATCH",
        )
        session.outbox.put_nowait(None)

    def _token_refusal(self, session: MinerSession, *, fresh: bool = False) -> AitbcError | None:
        return session.token_check(fresh) if session.token_check is not None else None

    def _close_for_token(self, session: MinerSession, why: AitbcError) -> None:
        """End the stream of a revoked or expired token. Its leases are
        cancelled now, so an honest sidecar stops the work, and requeued as
        the stream ends (miner_left)."""
        if session.closed_by is not None:
            return
        audit("miner_stream_closed_token", miner_id=session.miner_id, reason=why.reason)
        session.draining = True
        session.closed_by = why
        for lease_id in list(session.leases):
            session.outbox.put_nowait(
                cpb.ConnectResponse(cancel=cpb.CancelAssignment(lease_id=lease_id, reason=why.message))
            )
        session.outbox.put_nowait(None)

    def _sweep_tokens(self) -> None:
        """Close the streams whose token was revoked or expired since they
        opened: the gate only sees a stream's token when it opens. Each
        replica sweeps its own streams from the same tokens file."""
        for session in list(self.sessions.values()):
            why = self._token_refusal(session)
            if why is not None:
                self._close_for_token(session, why)

    async def reset_miner_key(self, caller: Principal, miner_id: str, new_key: bytes, reason: str,
                              request_id: str) -> st.KeyReset:  # fmt: skip
        reset = await self.db(self.store.reset_miner_key, miner_id, new_key, request_id, caller.name, reason)
        if reset is None:
            raise NotFound(f"no miner {miner_id!r} is registered", field="miner_id", reason="MINER_NOT_FOUND")
        if reset.conflict:
            raise AlreadyExists("request_id was already used for another reset", field="request_id",
                                reason="REQUEST_ID_REUSED")  # fmt: skip
        if reset.applied:
            audit("miner_key_reset", by=caller.name, miner_id=miner_id, old_key=reset.old_key.hex(),
                  new_key=reset.new_key.hex(), reason=reason, request_id=request_id)  # fmt: skip
        else:
            log.info("miner_key_reset_retried", by=caller.name, miner_id=miner_id, request_id=request_id)
        # Also on a retry: the first attempt may have died before this.
        await self.check_miner_key(miner_id)
        return reset

    async def miner_left(self, session: MinerSession, reason: str) -> None:
        if self.sessions.get(session.miner_id) is session and not self._stopping:
            del self.sessions[session.miner_id]
            held = dict(session.leases)
            session.leases.clear()  # a result still arriving on this stream is the new stream's to deliver
            if self._keeps_leases(session):
                # A cut stream is not lost work: the sidecar runs its jobs on
                # and keeps their results until a stream takes them. Its
                # leases wait out the grace (see _leases) for it to reconnect.
                self.leases.gone(held)
                if held:
                    log.info("leases_kept_for_reconnect", miner_id=session.miner_id, leases=len(held),
                             grace_secs=self.settings.reconnect_grace_secs)  # fmt: skip
                held = {}
            # Closed for cause (a revoked token, a replaced key, a ban), or
            # draining (it handed back what it runs): requeue now.
            for lease_id, (job_id, _) in held.items():
                rec = await self.db(self.store.get, job_id)
                if rec is not None and rec.lease_id == lease_id and rec.state in st.LEASED:
                    await self._retry_or_fail(
                        rec, st.LEASED, f"miner {session.miner_id} disconnected", expect_lease=lease_id
                    )
        for up in session.uploads.values():
            up.path.unlink(missing_ok=True)
        # Its GPUs' labels go with it; those a newer stream of the same miner
        # declared too are that stream's now.
        current = self.sessions.get(session.miner_id)
        M.forget_gpus(session.miner_id, session.gpus - (current.gpus if current is not None else frozenset()))
        log.info(
            "miner_left", miner_id=session.miner_id, reason=reason,
            undeclared_telemetry=session.undeclared_telemetry or None, stale_leases=session.stale_leases or None,
        )  # fmt: skip
        self.wake()

    def _keeps_leases(self, session: MinerSession) -> bool:
        """Whether a miner whose stream ended may come back for its leases."""
        return self.settings.reconnect_grace_secs > 0 and session.closed_by is None and not session.draining

    async def heartbeat(self, session: MinerSession, draining: bool = False, telemetry: Any = ()) -> None:
        declared: dict[int, Any] = {}
        undeclared = 0
        for t in telemetry:
            if t.index in session.gpus:
                declared[t.index] = t
            else:
                undeclared += 1
        if undeclared:
            if not session.undeclared_telemetry:  # once per stream: a flood must not flood the log too
                log.warning(
                    "telemetry_undeclared_gpus", miner_id=session.miner_id, declared=sorted(session.gpus),
                    dropped=undeclared,
                )  # fmt: skip
            session.undeclared_telemetry += undeclared
        session.telemetry = list(declared.values())
        M.gpu_telemetry(session.miner_id, session.telemetry)
        if draining and not session.draining:
            session.draining = True
            log.info("miner_draining", miner_id=session.miner_id)
        # Liveness is kept here; the store's deadline is for other replicas
        # and restarts, which only need to see it move within a lease (they
        # wait a lease and a grace). So: no write for a miner holding
        # nothing, and at most one per third of a lease for one that does.
        now = time.monotonic()
        store = bool(session.leases) and now - session.leases_stored_at >= self.settings.lease_secs / 3
        deadline = time.time() + self.settings.lease_secs
        self.leases.renewed(session.leases, deadline if store else None)
        if store:
            session.leases_stored_at = now
            # The lease lives here, renewed above. Ending the stream because
            # the database is away would cost every running job its lease
            # once the outage outlasts the reconnect grace; health already
            # says NOT_SERVING.
            with suppress(StorageUnavailable):
                await self.db(self.store.extend_leases, session.miner_id, deadline)
        if not session.healthy:
            session.healthy = True
            log.info("miner_healthy_again", miner_id=session.miner_id)
            self.wake()

    def _lease_of(self, session: MinerSession, lease_id: str) -> str | None:
        entry = session.leases.get(lease_id)
        if entry is None:
            session.stale_leases += 1
            if session.stale_leases <= LOGGED_STALE_LEASES:  # then only counted, in miner_left
                log.warning("stale_lease_refused", miner_id=session.miner_id, lease_id=lease_id[:LEASE_ID_ECHO])
            return None
        return entry[0]

    def progress(self, session: MinerSession, p: cpb.JobProgress) -> None:
        entry = session.leases.get(p.lease_id)
        if entry is None:
            return
        job_id = entry[0]
        self.progress_of[job_id] = (min(1.0, max(0.0, p.fraction)), p.message[:MAX_PROGRESS_MESSAGE])
        if self.watch_hub.watching(job_id) and job_id not in self._progress_due:
            # One snapshot per job per PROGRESS_INTERVAL however fast a miner
            # reports: each costs a store read and a send to every watcher.
            # The last report of a burst is shown, an interval later.
            self._progress_due.add(job_id)
            self.spawn(self._show_progress(job_id))

    async def _show_progress(self, job_id: str) -> None:
        try:
            await asyncio.sleep(PROGRESS_INTERVAL)
        finally:
            self._progress_due.discard(job_id)
        await self._republish(job_id)

    async def accepted(self, session: MinerSession, lease_id: str) -> None:
        job_id = self._lease_of(session, lease_id)
        if job_id is None:
            return
        self._publish(
            await self.db(
                self.store.transition, job_id, from_states=[st.ASSIGNED], expect_lease=lease_id, state=st.RUNNING
            )
        )

    def chunk(self, session: MinerSession, c: cpb.ResultChunk) -> None:
        entry = session.leases.get(c.lease_id)
        if entry is None:
            return
        up = session.uploads.get(c.lease_id)
        if up is None:
            up = session.uploads[c.lease_id] = Upload(self.blobs / "incoming" / c.lease_id, entry[1])
            up.path.write_bytes(b"")
        if c.offset != up.size or up.size + len(c.data) > up.limit:
            log.warning("bad_chunk", lease_id=c.lease_id, offset=c.offset, size=up.size, limit=up.limit)
            up.size = up.limit + 1  # poison: the result will be refused
            return
        with up.path.open("ab") as f:
            f.write(c.data)
        up.sha.update(c.data)
        up.size += len(c.data)

    async def result(self, session: MinerSession, res: cpb.JobResult) -> None:
        lease_id = res.lease_id
        job_id = self._lease_of(session, lease_id)
        if job_id is None:
            # Told so only while it reads what it is sent: a miner that floods
            # results for leases it does not hold and never reads would have
            # each answer queued for it (each echoing an id of its choosing).
            if session.outbox.qsize() < MAX_UNREAD:
                await self._ack(session, lease_id[:LEASE_ID_ECHO], "VERDICT_UNSPECIFIED",
                                "stale or unknown lease: result refused")  # fmt: skip
            return
        # Taken off the session before anything waits: a stream that ends
        # meanwhile deletes the uploads still on it, and this one is whole.
        up = session.uploads.pop(lease_id, None)
        # A result that races its token's revocation is not paid: the sweep
        # may not have closed the stream yet, so look at the tokens file now
        # (one stat). The lease stays on the session: closing requeues it.
        why = self._token_refusal(session, fresh=True)
        if why is not None:
            if up:
                up.path.unlink(missing_ok=True)
            await self._ack(session, lease_id, "VERDICT_UNSPECIFIED", f"{why.message}; result refused")
            self._close_for_token(session, why)
            return
        # The store, not the session, says which key signs for the miner: a
        # reset on another replica may not have reached us yet. The lease
        # stays on the session, so closing it requeues the job, and the
        # refusal does not count against the miner id's new owner.
        if await self._stale_key(session):
            if up:
                up.path.unlink(missing_ok=True)
            await self._ack(session, lease_id, "VERDICT_BAD_SIGNATURE",
                            "this miner's key was replaced: a receipt under the old key is refused")  # fmt: skip
            self._close_stale(session)  # after the ack: it learns why
            return
        # Through an outage of the database this waits, the lease still on
        # the session so heartbeats keep it: a result is not lost to one.
        faulted = False

        async def to_verifying() -> JobRecord | None:
            nonlocal faulted
            try:
                return await self.db(
                    self.store.transition, job_id, from_states=st.LEASED, expect_lease=lease_id, state=st.VERIFYING
                )
            except StorageUnavailable:
                faulted = True
                raise

        rec = await self._until_stored(to_verifying)
        if rec is None and faulted and up is not None:
            # A compare-and-set that may have committed as the database went
            # away is not run again: it would find its own change. Ours if
            # the job is VERIFYING under this lease and this call holds the
            # upload (a duplicate result on the stream has none).
            now = await self._until_stored(lambda: self.db(self.store.get, job_id))
            if now is not None and now.state == st.VERIFYING and now.lease_id == lease_id:
                rec = now
        session.leases.pop(lease_id, None)
        if rec is None:
            await self._ack(session, lease_id, "VERDICT_UNSPECIFIED", "lease no longer valid: result refused")
            if up:
                up.path.unlink(missing_ok=True)
            self.wake()
            return
        self._publish(rec)
        try:
            await self._judge(session, rec, res, up)
        except Exception as exc:
            # Never leave a job stuck in VERIFYING: hand it out again, once
            # the store answers again if it is what failed.
            log.exception("verification_error", job_id=job_id)
            if up:
                up.path.unlink(missing_ok=True)
            cause = "the database was away" if isinstance(exc, StorageUnavailable) else "internal error"
            await self._until_stored(
                lambda: self._retry_or_fail(rec, [st.VERIFYING], f"{cause} while verifying the result")
            )

    async def _judge_miner(self, miner_id: str, accepted: bool) -> tuple[float, bool]:
        """Record a verdict in the miner's standing: (its reputation now,
        whether it is now banned)."""
        good, bad = await self.db(self.store.record_verdict, miner_id, accepted)
        rep = reputation(good, bad)
        session = self.sessions.get(miner_id)
        if session is not None:
            session.reputation = rep
        if self.banned((good, bad)):
            audit("miner_banned", miner_id=miner_id, refused=bad, accepted=good)
            return rep, True
        return rep, False

    def banned(self, accepted_refused: tuple[int, int]) -> bool:
        return accepted_refused[1] >= self.settings.ban_after

    async def _judge(self, session: MinerSession, rec: JobRecord, res: cpb.JobResult, up: Upload | None) -> None:
        lease_id = res.lease_id
        # Size and digest were taken as the upload streamed in: the receipt,
        # a copied receipt and a size no correct output has are all refused
        # before a byte of the output is read.
        poisoned = up is not None and up.size > up.limit
        size = up.size if up is not None else 0
        outcome = await asyncio.to_thread(
            check_result,
            network_id=self.settings.network_id,
            job=rec,
            lease_id=lease_id,
            miner_key=session.public_key,
            receipt=res.receipt,
            output_size=size,
            output_sha256=up.sha.digest() if up is not None and not poisoned else b"",
        )
        body = outcome.body
        run = Run(
            miner_id=session.miner_id,
            payout_address=session.payout_address,
            lease_id=lease_id,
            output_sha256=body.output_sha256.hex() if body else "",
            receipt=res.receipt.SerializeToString().hex(),
            usage=body.usage.SerializeToString().hex() if body else "",
            nonce=body.nonce.hex() if body else "",
            verdict=outcome.verdict,
            detail=outcome.detail,
            operator=session.operator,
            returned_at=time.time(),
        )
        runs = load_runs(rec)
        copied = next((r for r in runs if body is not None and r.nonce == run.nonce), None)
        if copied is not None:
            run.verdict, run.detail = DISAGREED, f"the receipt copies the one {copied.miner_id} returned"
        workload, params = workload_of(cpb.JobSpec.FromString(rec.spec))
        if run.verdict in (ACCEPTED, BAD_OUTPUT):
            problem = "no output was uploaded" if up is None else unread_size_problem(rec, size, poisoned)
            if problem:
                run.verdict, run.detail = BAD_OUTPUT, problem
        if run.verdict == ACCEPTED:
            assert up is not None
            check = await self.checks.run(workload.check_memory(params, size), workload.check_file, params, up.path)
            run.verdict, run.detail = (ACCEPTED if check.ok else BAD_OUTPUT), check.detail
        log.info(
            "result_checked", job_id=rec.job_id, miner_id=session.miner_id, verdict=run.verdict, detail=run.detail,
        )  # fmt: skip
        if run.verdict != ACCEPTED:
            if up:
                up.path.unlink(missing_ok=True)
            await self._refuse(session, rec, run, runs)
            return
        assert up is not None
        # The check can take seconds: a token revoked meanwhile is not paid
        # either. The run is not recorded against the miner, only dropped.
        why = self._token_refusal(session, fresh=True)
        if why is not None:
            up.path.unlink(missing_ok=True)
            await self._retry_or_fail(rec, [st.VERIFYING], f"result from {session.miner_id} not paid: {why.message}",
                                      refused_miners=_excluding(rec, session.miner_id))  # fmt: skip
            await self._ack(session, lease_id, "VERDICT_UNSPECIFIED", f"{why.message}; result refused")
            self._close_for_token(session, why)
            return
        output = await asyncio.to_thread(self.blob_files.put, up.path, run.output_sha256)
        run.verdict = PENDING
        # A run held for agreement whose miner lost every token since (revoked,
        # expired) is withdrawn: it is neither paid nor counted as agreeing.
        for r in runs:
            if r.verdict == PENDING and not self.miner_token_live(r.miner_id):
                r.verdict, r.detail = WITHDRAWN, "not paid: no live token speaks for this miner any more"
                log.info("run_withdrawn", job_id=rec.job_id, miner_id=r.miner_id)
        pending = [r for r in runs if r.verdict == PENDING]
        # Pending runs that disagree already: this run is a referee's.
        run.referee = _dispute_since(runs) is not None
        agreeing = []
        for r in pending:
            if workload.self_checking:
                agreeing.append(r)  # each passed a check that proves it correct
                continue
            memory = workload.check_memory(params, size)
            check = await self.checks.run(memory, _agree_files, workload, params, self.blobs / r.output_sha256, output)
            if check.ok:
                agreeing.append(r)
        run.group = agreeing[0].group if agreeing else 1 + max((r.group for r in runs), default=0)
        # Once runs disagree, counting identities decides nothing: a side is
        # paid only when a referee, drawn at random among miners independent
        # of every run so far, agrees with it. The other side is refuted.
        disputed = run.referee or len(agreeing) < len(pending)
        refereed = run.referee or any(r.referee for r in agreeing)
        if len(agreeing) + 1 >= rec.runs_needed and (refereed or not disputed):
            winners = [*agreeing[: rec.runs_needed - 1], run]
            losers = [r for r in pending if r not in agreeing]
            await self._settle(session, rec, [*runs, run], winners, losers)
            return
        # Hold this result until enough other miners' runs agree with it.
        M.VERDICTS.labels(rec.workload, PENDING).inc()
        have = len(agreeing) + 1
        runs.append(run)
        await self._retry_or_fail(
            rec,
            [st.VERIFYING],
            (
                f"runs disagree ({have} of {rec.runs_needed} agreeing with the latest): waiting for a referee"
                if disputed
                else f"{have} of {rec.runs_needed} agreeing results in; waiting for a run on another miner"
            ),
            verdict=PENDING,
            refused_miners=_excluding(rec, session.miner_id),
            runs=dump_runs(runs),
            requeue_detail=True,
        )
        if disputed:
            self._referee_due[rec.job_id] = time.monotonic() + self.settings.referee_wait_secs
        await self._ack(session, lease_id, "VERDICT_PENDING", run.detail, reputation=session.reputation)

    async def _refuse(self, session: MinerSession, rec: JobRecord, run: Run, runs: list[Run]) -> None:
        M.VERDICTS.labels(rec.workload, run.verdict).inc()
        run.reputation, banned = await self._judge_miner(session.miner_id, False)
        await self._retry_or_fail(
            rec,
            [st.VERIFYING],
            f"result from {session.miner_id} refused ({run.detail})",
            verdict=run.verdict,
            refused_miners=_excluding(rec, session.miner_id),
            runs=dump_runs([*runs, run]),
        )
        await self._ack(session, run.lease_id, f"VERDICT_{run.verdict}", run.detail, reputation=run.reputation)
        if banned:
            _close_banned(session)  # after the ack: it learns why

    async def _settle(
        self, session: MinerSession, rec: JobRecord, runs: list[Run], winners: list[Run], losers: list[Run]
    ) -> None:
        """Pay every miner whose run agreed (one settlement, one hold), and
        refuse the runs that disagreed with them."""
        run_price = rec.price // rec.runs_needed
        fee_each = run_price * self.settings.fee_bps // 10_000
        pay_each = run_price - fee_each
        banned: list[str] = []
        for r in winners:
            r.verdict = ACCEPTED
            r.reputation, _ = await self._judge_miner(r.miner_id, True)
            M.VERDICTS.labels(rec.workload, ACCEPTED).inc()
            M.MINER_EARNINGS.labels(r.miner_id).inc(pay_each)
            usage = signing_pb2.Usage.FromString(bytes.fromhex(r.usage))
            if 0 < usage.energy_joules < math.inf:  # the miner's figure: NaN would poison the histogram
                M.ENERGY_JOULES.labels(rec.workload).observe(usage.energy_joules)
        for r in losers:
            M.VERDICTS.labels(rec.workload, DISAGREED).inc()
            r.verdict = DISAGREED
            r.detail = f"disagrees with the result {len(winners)} other miner(s) agreed on"
            r.reputation, now_banned = await self._judge_miner(r.miner_id, False)
            if now_banned:
                banned.append(r.miner_id)
        primary = winners[0]
        receipt = signing_pb2.Signed.FromString(bytes.fromhex(primary.receipt))
        settlement = seal(
            signing_pb2.SettlementBody(
                network_id=self.settings.network_id,
                job_id=rec.job_id,
                client_address=rec.client_address,
                miner_address=primary.payout_address,
                hold_amount=rec.max_price,
                miner_amount=pay_each,
                fee_amount=fee_each * len(winners),
                receipt_sha256=crypto.sha256(receipt.body),
                verdict_time=ts_now(),
                co_payouts=[signing_pb2.Payout(address=r.payout_address, amount=pay_each) for r in winners[1:]],
            ),
            crypto.SETTLEMENT_DOMAIN,
            self.key,
        )
        # The verdict and the intent to pay commit together: a crash after
        # this pays exactly once, through the outbox.
        settling = await self.db(
            self.store.transition,
            rec.job_id,
            from_states=[st.VERIFYING],
            state=st.SETTLING,
            miner_id=primary.miner_id,
            verdict=ACCEPTED,
            output_sha256=bytes.fromhex(primary.output_sha256),
            usage=bytes.fromhex(primary.usage),
            receipt=receipt.SerializeToString(),
            settlement=settlement.SerializeToString(),
            miner_amount=pay_each * len(winners),
            fee_amount=fee_each * len(winners),
            status_detail="",
            runs=dump_runs(runs),
            outbox=("settle", settlement.SerializeToString()),
        )
        self._publish(settling)
        self._outbox_wake.set()
        for r in [*winners, *losers]:
            target = session if r.miner_id == session.miner_id else self.sessions.get(r.miner_id)
            if target is not None:
                amount = pay_each if r.verdict == ACCEPTED else 0
                await self._ack(target, r.lease_id, f"VERDICT_{r.verdict}", r.detail, amount, r.reputation)
                if r.miner_id in banned:
                    _close_banned(target)
        self.wake()

    async def failure(self, session: MinerSession, f: cpb.JobFailure) -> None:
        job_id = self._lease_of(session, f.lease_id)
        if job_id is None:
            return
        session.leases.pop(f.lease_id, None)
        up = session.uploads.pop(f.lease_id, None)
        if up:
            up.path.unlink(missing_ok=True)
        rec = await self.db(self.store.get, job_id)
        if rec is not None:
            await self._retry_or_fail(rec, st.LEASED, f"miner reported: {f.reason[:500]}", expect_lease=f.lease_id)
        self.wake()

    async def _ack(
        self, session: MinerSession, lease_id: str, verdict: str, detail: str, amount: int = 0, reputation: float = 0.0
    ) -> None:
        session.outbox.put_nowait(
            cpb.ConnectResponse(
                ack=cpb.ResultAck(
                    lease_id=lease_id,
                    verdict=cpb.Verdict.Value(verdict),
                    detail=detail,
                    miner_amount=amount,
                    reputation=reputation,
                )
            )
        )

    # -- leases -----------------------------------------------------------

    async def _hold_loop(self) -> None:
        """Jobs whose hold the wallet never confirmed (it was away, or the
        coordinator restarted mid-submit, and the client did not retry): ask
        again until it answers, backing off while it is away. A task of its
        own: each ask of an absent wallet waits out its deadline, which must
        hold up neither leases nor dispatch."""
        delay = 1.0
        while True:
            await asyncio.sleep(delay)
            try:
                reached = await self._sweep_holding()
            except Exception:
                log.exception("hold_loop_error")
                reached = False
            delay = HOLD_SWEEP_SECS if reached else min(2 * delay, HOLD_SWEEP_SECS)

    async def _sweep_holding(self) -> bool:
        """Ask the wallet again for the holds seen unconfirmed for a whole
        sweep (a younger one may be a submit in flight). False when the
        wallet could not be reached: the rest wait for the next pass."""
        now = time.monotonic()
        holding = await self.db(self.store.in_states, [st.HOLDING])
        self._holding_since = {r.job_id: self._holding_since.get(r.job_id, now) for r in holding}
        for rec in holding:
            if now - self._holding_since[rec.job_id] < HOLD_SWEEP_SECS:
                continue
            try:
                confirmed = await self._confirm_hold(rec)
            except Unavailable:
                return False
            except AitbcError:
                continue  # refused for good: the job is gone
            log.info("hold_confirmed_late", job_id=rec.job_id, state=confirmed.state)
        return True

    async def _lease_loop(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.settings.lease_secs / 4))
            try:
                self._sweep_tokens()
                # Here, not only in the dispatcher: with every slot busy it
                # stops before the jobs at the back of the queue.
                for job_id, due in list(self._referee_due.items()):
                    if due <= time.monotonic():
                        rec = await self.db(self.store.get, job_id)
                        since = _dispute_since(load_runs(rec)) if rec is not None and rec.state == st.QUEUED else None
                        if rec is None or since is None:
                            self._referee_due.pop(job_id, None)
                        else:
                            await self._unrefereed(rec, since)
                # A client's deadline is a wall-clock time by contract: it
                # is read against the wall clock (README, Clocks).
                expirable = [st.QUEUED, *st.LEASED]
                for rec in await self.db(self.store.expired, time.time(), expirable):
                    await self._end(rec, expirable, st.EXPIRED, "deadline passed before a verified result")
                scan_started = self.leases.now()
                rows = await self.db(self.store.live_leases)
                self.leases.observe([LeaseRow(*r) for r in rows], scan_started)
                for lease in self.leases.lapsed():
                    await self._lapse(lease)
                for lease in self.leases.overrun():
                    job = await self.db(self.store.get, lease.job_id)
                    if job is not None and job.lease_id == lease.lease_id and job.state in st.LEASED:
                        await self._take_back(job)
                    self.leases.ended(lease.lease_id)
                if time.monotonic() - self._last_bounds_sweep > BOUNDS_SWEEP_SECS:
                    self._last_bounds_sweep = time.monotonic()
                    await self.db(self.store.forget_lease_bounds)
            except Exception:
                log.exception("lease_loop_error")

    async def _lapse(self, lease: Lease) -> None:
        """Requeue a lease nobody renewed in time: its miner went silent on
        a stream here, or left and did not come back within the grace, or
        (held elsewhere) its holder stopped renewing it."""
        rec = await self.db(self.store.get, lease.job_id)
        if rec is None or rec.lease_id != lease.lease_id or rec.state not in st.LEASED:
            self.leases.ended(lease.lease_id)  # it ended meanwhile
            return
        why = "lease lapsed"
        if lease.holder == GONE:
            why = f"miner {rec.miner_id} did not reconnect within {self.settings.reconnect_grace_secs:g} s"
        session = self.sessions.get(rec.miner_id)
        if session is not None and session.leases.pop(rec.lease_id, None) is not None:
            # Quiet on an open stream (paused, wedged): no new work until it
            # heartbeats again.
            session.healthy = False
            session.outbox.put_nowait(
                cpb.ConnectResponse(cancel=cpb.CancelAssignment(lease_id=rec.lease_id, reason="lease lapsed"))
            )
        await self._retry_or_fail(rec, st.LEASED, why, expect_lease=rec.lease_id)
        self.leases.ended(lease.lease_id)

    # -- retention ----------------------------------------------------------

    async def _retention_loop(self) -> None:
        while True:
            try:
                await self._sweep_retention()
            except Exception:
                log.exception("retention_sweep_error")
            await asyncio.sleep(self.settings.retention_sweep_secs)

    async def _sweep_retention(self) -> None:
        """One batch of each: results to expire, finished rows to delete,
        old blobs no job needs; and the blob folder's size for the metric."""
        now = time.time()
        keep = self.settings.result_retention_days * DAY
        expired = deleted = 0
        if keep > 0:
            expired = await self.db(self.store.expire_results, _utc(now - keep).isoformat(), BATCH)
            if self.settings.job_retention_days > 0:
                cutoff = _utc(now - self.settings.job_retention_days * DAY).isoformat()
                deleted = await self.db(self.store.delete_finished, cutoff, BATCH)
        old_before = now - keep if keep > 0 else -math.inf
        scan = await asyncio.to_thread(self.blob_files.scan, old_before, BATCH)
        files = size = 0
        if scan.old:
            refs_read_at = time.monotonic()
            needed = await self.db(self.store.referenced_blobs, scan.old)
            files, size = await asyncio.to_thread(
                self.blob_files.delete, [d for d in scan.old if d not in needed], refs_read_at, old_before
            )
        stale = await asyncio.to_thread(self.blob_files.sweep_incoming, now)
        M.RESULT_BLOB_BYTES.set(scan.bytes - size)
        M.RESULT_BLOBS.set(scan.count - files)
        M.RESULT_BLOBS_DELETED.inc(files)
        if expired or deleted or files or stale:
            log.info("retention_swept", results_expired=expired, jobs_deleted=deleted, blobs_deleted=files,
                     bytes_freed=size, stale_uploads=stale or None)  # fmt: skip

    # -- settlement outbox --------------------------------------------------

    async def _outbox_loop(self) -> None:
        while True:
            with suppress(TimeoutError):
                await asyncio.wait_for(self._outbox_wake.wait(), timeout=1.0)
            self._outbox_wake.clear()
            try:
                # The store's next_attempt is wall-clock, for a restart and
                # other replicas; what this process scheduled is timed on
                # its monotonic clock, so a clock step neither holds a retry
                # back for an hour nor lets the backlog loose at once.
                now, mono = time.time(), time.monotonic()
                stored = await self.db(self.store.due_outbox, now, 500, now + 2 * OUTBOX_MAX_DELAY)
                due = [i for i in stored if self._outbox_due.get((i.job_id, i.kind), -math.inf) <= mono]
                for key in [k for k, at in self._outbox_due.items() if at < mono - 2 * OUTBOX_MAX_DELAY]:
                    del self._outbox_due[key]  # delivered by another replica
                settles = [i for i in due if i.kind == "settle"]
                reached = True
                if len(settles) > 1:
                    # Under load, one wallet call settles the whole backlog.
                    reached = await self._deliver_settlements(settles)
                elif settles:
                    reached = await self._deliver(settles[0])
                # An absent wallet makes every call wait out its deadline:
                # one try a pass until it answers again.
                for item in due if reached else []:
                    if item.kind == "release" and not await self._deliver(item):
                        break
                if len(due) == 500:
                    self._outbox_wake.set()
            except Exception:
                log.exception("outbox_loop_error")

    async def _deliver_settlements(self, items: list[st.OutboxItem]) -> bool:
        """False when the wallet could not be reached."""
        log.info("settlements_batched", count=len(items))
        try:
            results = await self.wallet.settle_many([signing_pb2.Signed.FromString(i.payload) for i in items])
        except WalletError as err:
            for item in items:
                await self._retry_later(item, str(err))
            return not err.unreachable
        for item, result in zip(items, results, strict=True):
            if result.HasField("error"):
                e = result.error
                await self._retry_later(item, f"{e.code} {e.reason}: {e.message}")
            else:
                await self._settled(item, result.hold)
        return True

    async def _deliver(self, item: st.OutboxItem) -> bool:
        """False when the wallet could not be reached."""
        try:
            if item.kind == "settle":
                await self._settled(item, await self.wallet.settle(signing_pb2.Signed.FromString(item.payload)))
                return True
            await self.wallet.release(item.job_id, item.payload.decode(errors="replace"))
        except WalletError as err:
            if item.kind == "release" and err.code.name == "NOT_FOUND":
                log.info("no_hold_to_release", job_id=item.job_id)
            else:
                await self._retry_later(item, str(err))
                return not err.unreachable
        new = await self.db(self.store.outbox_done, item.job_id, "release", from_states=[], hold_state="RELEASED")
        self._outbox_due.pop((item.job_id, item.kind), None)
        log.info("hold_released", job_id=item.job_id)
        self._publish(new)
        return True

    async def _settled(self, item: st.OutboxItem, hold: Any) -> None:
        self._outbox_due.pop((item.job_id, item.kind), None)
        new = await self.db(
            self.store.outbox_done, item.job_id, "settle", from_states=[st.SETTLING], state=st.SETTLED,
            hold_state="SETTLED",
        )  # fmt: skip
        log.info(
            "job_settled", job_id=item.job_id, miner_amount=hold.miner_amount, fee_amount=hold.fee_amount,
            refunded=hold.refunded_amount,
        )  # fmt: skip
        self._publish(new)

    async def _retry_later(self, item: st.OutboxItem, error: str) -> None:
        # Retried until the wallet answers: the wallet dedupes on the job id,
        # so a retry of a settlement that did land pays nothing more.
        delay = min(OUTBOX_MAX_DELAY, 0.5 * 2 ** min(item.attempts, 6)) * random.uniform(0.8, 1.2)
        log.warning("settlement_retry", job_id=item.job_id, kind=item.kind, error=error, retry_in=round(delay, 2))
        self._outbox_due[(item.job_id, item.kind)] = time.monotonic() + delay
        await self.db(self.store.outbox_retry, item.job_id, item.kind, time.time() + delay, error)


def _job_token(rec: JobRecord) -> str:
    return base64.urlsafe_b64encode(f"{rec.create_time}|{rec.job_id}".encode()).decode()


_JOB_ID = re.compile(r"job_[0-9a-f]{1,40}")


def _parse_job_token(token: str) -> tuple[str, str] | None:
    if not token:
        return None
    try:
        create_time, sep, job_id = base64.urlsafe_b64decode(token.encode()).decode().partition("|")
        # Both go into a query: text that is no time or id (a NUL byte, which
        # PostgreSQL refuses) must stop here, not in the store.
        datetime.fromisoformat(create_time)
    except (ValueError, UnicodeDecodeError):
        create_time, sep, job_id = "", "", ""
    if not sep or not _JOB_ID.fullmatch(job_id):
        raise InvalidArgument("page_token is not one this service issued", field="page_token")
    return create_time, job_id


_PLACEMENTS: OrderedDict[bytes, tuple[str, cpb.Requirements]] = OrderedDict()
PLACEMENTS_CACHED = 4096


def _placement(rec: JobRecord) -> tuple[str, cpb.Requirements]:
    """(model, requirements) a queued job needs of a miner. Cached: the
    dispatcher asks for every queued job on every pass, and parsing and
    validating an embed job's 256 texts each time is work done over and over.
    Keyed by the spec's digest, not the spec: 4096 specs as keys would pin
    up to 256 MiB."""
    hit = _PLACEMENTS.get(rec.spec_sha256)
    if hit is not None:
        _PLACEMENTS.move_to_end(rec.spec_sha256)
        return hit
    spec = cpb.JobSpec.FromString(rec.spec)
    workload, params = workload_of(spec)
    hit = _PLACEMENTS[rec.spec_sha256] = (workload.model(params), spec.requirements)
    if len(_PLACEMENTS) > PLACEMENTS_CACHED:
        _PLACEMENTS.popitem(last=False)
    return hit


def _dispute_since(runs: list[Run]) -> float | None:
    """When the job's pending runs came to disagree (the latest of them was
    judged), or None while they agree."""
    pending = [r for r in runs if r.verdict == PENDING]
    if len({r.group for r in pending}) < 2:
        return None
    # Runs judged before this rule carry no time: wait from now.
    return max(r.returned_at for r in pending) or time.time()


def _close_banned(session: MinerSession) -> None:
    """End a banned miner's stream. It cannot come back, so its other
    leases are requeued as the stream ends, not after the reconnect grace."""
    session.draining = True
    session.outbox.put_nowait(None)


def _excluding(rec: JobRecord, miner_id: str) -> str:
    """The job's excluded miners, plus this one."""
    return f"{rec.refused_miners} {miner_id}".strip()


def _agree_files(workload: Any, params: Any, a: Path, b: Path) -> Check:
    try:
        return workload.agree_files(params, a, b)
    except FileNotFoundError as exc:
        log.warning("blob_missing", path=str(exc.filename))
        return Check(False, "an earlier run's output is no longer stored")


def _utc(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)
