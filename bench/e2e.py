"""`make bench e2e` (`python -m bench e2e [--quick]`): the coordinator end to
end, real wallet and coordinator processes driven by lean simulated miners
and submitters (bench/e2e_load.py), and the same load against a bare-bones
coordinator of our own (bench/baseline.py) in the same run, so every figure
reads as a ratio to the least a coordinator must do.

Per run, on a fresh network and database:
- load: N miners; M submitters keep M x DEPTH jobs awaiting their verdict
  (saturation: settled jobs/s, coordinator CPU per job); one job at a time
  (dispatch latency at light load); then an open loop paced at 80 % of the
  saturation rate just measured (dispatch latency, submit -> SETTLED).
- queue: QUEUE_JOBS jobs submitted with no miner connected; the
  coordinator's CPU while they wait; then miners join (how soon the first
  assignment comes, how fast the queue drains, a freed miner's wait for its
  next job).
- idle: IDLE_MINERS connected miners that only send heartbeats (RSS, CPU),
  then a trickle of jobs among them (dispatch latency).

Every figure is the median of RUNS runs; BENCHMARKS.md gets the table
between its bench:e2e markers (a --quick run only prints it).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import multiprocessing as mp
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import grpc
import nacl.signing

from aitbc.addresses import address_of
from aitbc.auth import Principal, TokenTable, new_token
from aitbc.localnet import ROOT, Network, make_network
from aitbc.pgtemp import PostgresUnavailable, TempPostgres
from aitbc.v1 import coordinator_pb2 as cpb
from aitbc.v1 import coordinator_pb2_grpc, wallet_pb2, wallet_pb2_grpc
from bench.e2e_load import MinerSpec, Shared, worker_main

BEGIN, END = "<!-- bench:e2e:begin -->", "<!-- bench:e2e:end -->"
UNLIMITED = ["--rate-limits", "client=1000000,miner=1000000,admin=1000000"]
CLK_TCK = os.sysconf("SC_CLK_TCK")
LIVE_STATES = [
    cpb.JOB_STATE_QUEUED, cpb.JOB_STATE_ASSIGNED, cpb.JOB_STATE_RUNNING, cpb.JOB_STATE_VERIFYING,
    cpb.JOB_STATE_SETTLING,
]  # fmt: skip

# The aims (issue #15).
AIM_RATE_100 = 1000.0
AIM_CPU_US = 1000.0
AIM_P50_MS, AIM_P99_MS = 5.0, 25.0
AIM_IDLE_RSS_MIB, AIM_IDLE_CPU_PCT = 1024.0, 5.0
AIM_PG_RATE, AIM_PG_SCALE = 300.0, 1.6


@dataclass(frozen=True)
class Options:
    runs: int = 3
    # Seconds each measured window lasts, after `warmup` unmeasured ones:
    # short, so that the whole bench stays near 20 minutes on 2 cores.
    window: float = 5.0
    warmup: float = 1.5
    light: float = 3.0
    submitters: int = 16
    depth: int = 4
    # Load-generator processes.
    workers: int = 2
    n: int = 8
    miners: tuple[int, ...] = (1, 10, 100, 1000)
    pg_miners: int = 100
    queue_jobs: int = 20_000
    queue_miners: int = 100
    idle_miners: int = 10_000
    idle_workers: int = 4
    # Seconds the idle miners get to connect; those still out then give up.
    idle_connect: float = 120.0
    # Measured windows of the queue and idle runs (one run each: filling
    # the queue and connecting the miners take minutes).
    windows: int = 3
    trickle: int = 40
    trickle_rate: float = 5.0
    postgres: bool = True


QUICK = Options(
    runs=1, window=3.0, warmup=1.0, light=2.0, miners=(1, 100), queue_jobs=2_000, idle_miners=1_000,
    idle_workers=2, idle_connect=60.0, windows=2, trickle=15,
)  # fmt: skip


# -- process measurements ---------------------------------------------------


def cpu_secs(pid: int, children: bool = False) -> float:
    """User + system CPU seconds of a process (all its threads), with its
    reaped children's when asked."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLK_TCK


def rss_mib(pid: int) -> float:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def postgres_pids(pg: TempPostgres) -> list[int]:
    """The postmaster and its backends."""
    try:
        master = int((pg.dir / "data" / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return []
    pids = [master]
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                if int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == master:
                    pids.append(int(proc.name))
    return pids


@dataclass
class Sample:
    mono: float
    wall: float
    coordinator: float
    wallet: float
    generator: list[float]
    postgres: float
    # Results accepted since the window began (set at its end).
    verified: int = 0


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def median(xs: list[float]) -> float:
    xs = [x for x in xs if x == x]
    return statistics.median(xs) if xs else float("nan")


# -- a network under load ---------------------------------------------------


@dataclass
class Rig:
    """Wallet, coordinator replica(s) or the baseline, and the load
    workers, on a fresh network in a temporary folder."""

    kind: str  # "aitbc" or "baseline"
    opts: Options
    store: str = "sqlite"
    replicas: int = 1
    workers: int = 2
    pg: TempPostgres | None = None
    net: Network = field(init=False)
    tmp: Path = field(init=False)
    shared: Shared = field(init=False)
    conns: list[Connection] = field(default_factory=list)
    procs: list[Any] = field(default_factory=list)
    names: list[str] = field(default_factory=list)

    def __enter__(self) -> Rig:
        self.tmp = Path(tempfile.mkdtemp(prefix="aitbc-e2e-"))
        self.net = make_network(self.tmp / "net")
        try:
            self._start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _start(self) -> None:
        self.net.start_wallet(*UNLIMITED)
        db = self.pg.new_database() if self.store == "postgres" and self.pg else None
        self.names = ["coordinator"] + [f"coordinator{i + 1}" for i in range(1, self.replicas)]
        for name in self.names:
            if self.kind == "baseline":
                ready = self.net.root / "run" / f"{name}.port"
                self.net.spawn(
                    name, "bench.baseline",
                    ["--port", "0", "--tokens-file", str(self.net.root / "principals.json"),
                     "--key-file", str(self.net.root / "coordinator.key"), "--wallet-target", self.net.wallet_target,
                     "--ready-file", str(ready)],
                    {"AITBC_COORD_WALLET_TOKEN": self.net.ids["coordinator"].token}, ready,
                )  # fmt: skip
            else:
                self.net.start_coordinator(*UNLIMITED, name=name, coord_db=db)
        asyncio.run(self._mint())
        ctx = mp.get_context("spawn")
        self.shared = Shared(*(ctx.Array("q", self.workers, lock=False) for _ in range(4)))
        for i in range(self.workers):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=worker_main, args=(i, child, self.shared), daemon=True)
            p.start()
            self.conns.append(parent)
            self.procs.append(p)

    def __exit__(self, *exc: object) -> None:
        for conn in self.conns:
            with contextlib.suppress(Exception):
                conn.send(("exit", {}))
        for p in self.procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()
        self.net.stop_all()
        if not os.environ.get("E2E_KEEP"):
            shutil.rmtree(self.tmp, ignore_errors=True)

    @property
    def targets(self) -> list[str]:
        return [self.net.target(n) for n in self.names]

    @property
    def client_token(self) -> str:
        return self.net.ids["client"].token

    async def _mint(self) -> None:
        async with grpc.aio.insecure_channel(self.net.wallet_target) as ch:
            await wallet_pb2_grpc.WalletServiceStub(ch).Mint(
                wallet_pb2.MintRequest(address=self.net.ids["client"].address, amount=10**15, request_id="e2e"),
                metadata=(("authorization", f"Bearer {self.net.ids['admin'].token}"),), timeout=30,
            )  # fmt: skip

    def add_miners(self, count: int) -> list[MinerSpec]:
        """`count` miner identities, their tokens live at once: one write
        of the principals file, whatever the count."""
        specs, pairs = [], [(i.token, i.principal) for i in self.net.ids.values()]
        targets = self.targets
        for i in range(count):
            seed = secrets.token_bytes(32)
            address = address_of(bytes(nacl.signing.SigningKey(seed).verify_key))
            token, miner_id = new_token(), f"bm-{i:05d}"
            pairs.append((token, Principal(f"bench-miner-{i}", "miner", address=address, miner_id=miner_id)))
            specs.append(MinerSpec(miner_id, token, seed, address, targets[i % len(targets)]))
        TokenTable.dump(self.net.root / "principals.json", pairs)
        # The services reload the file within a second of its change.
        time.sleep(1.2)
        return specs

    def send(self, name: str, per_worker: list[dict[str, Any] | None]) -> list[int]:
        sent = []
        for i, kwargs in enumerate(per_worker):
            if kwargs is not None:
                self.conns[i].send((name, kwargs))
                sent.append(i)
        return sent

    def recv(self, sent: list[int], timeout: float = 600) -> list[dict[str, Any]]:
        out = []
        for i in sent:
            if not self.conns[i].poll(timeout):
                raise RuntimeError(f"load worker {i} did not answer within {timeout:.0f} s")
            got = self.conns[i].recv()
            if "error" in got:
                raise RuntimeError(f"load worker {i}: {got['error']}")
            out.append(got)
        return out

    def ask(self, name: str, per_worker: list[dict[str, Any] | None], timeout: float = 600) -> list[dict[str, Any]]:
        return self.recv(self.send(name, per_worker), timeout)

    def connect(self, specs: list[MinerSpec], timeout: float = 300) -> tuple[int, float, list[str]]:
        shares = [specs[i :: self.workers] for i in range(self.workers)]
        got = self.ask("connect", [{"specs": s, "wait": timeout} for s in shares], timeout + 60)
        return sum(g["welcomed"] for g in got), max(g["seconds"] for g in got), [e for g in got for e in g["errors"]]

    def split(self, total: int) -> list[int]:
        return [total // self.workers + (1 if i < total % self.workers else 0) for i in range(self.workers)]

    def sample(self) -> Sample:
        procs = self.net.procs
        return Sample(
            mono=time.monotonic(),
            wall=time.time(),
            coordinator=sum(cpu_secs(procs[n].pid) for n in self.names),
            wallet=cpu_secs(procs["wallet"].pid),
            generator=[cpu_secs(p.pid) for p in self.procs],
            postgres=sum(cpu_secs(pid, children=True) for pid in postgres_pids(self.pg))
            if self.pg and self.store == "postgres"
            else 0.0,
        )

    def rss(self) -> float:
        return sum(rss_mib(self.net.procs[n].pid) for n in self.names)

    def drain(self, timeout: float = 60) -> bool:
        """Wait until every submitted job has its verdict."""
        deadline = time.monotonic() + timeout
        while self.shared.outstanding() > 0:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def collect(self) -> dict[str, Any]:
        got = self.ask("collect", [{} for _ in range(self.workers)])
        return {
            "assigned": {k: v for g in got for k, v in g["assigned"].items()},
            "acks": [x for g in got for x in g["acks"]],
            "refusals": [r for g in got for r in g["refusals"]],
            "submit_errors": sum((Counter(g["submit_errors"]) for g in got), Counter()),
            "streams_ended": [e for g in got for e in g["streams_ended"]],
        }

    def jobs(self, live_only: bool = False) -> list[cpb.Job]:
        return asyncio.run(self._jobs(live_only))

    async def _jobs(self, live_only: bool) -> list[cpb.Job]:
        md = (("authorization", f"Bearer {self.client_token}"),)
        out: list[cpb.Job] = []
        async with grpc.aio.insecure_channel(self.targets[0]) as ch:
            stub = coordinator_pb2_grpc.CoordinatorServiceStub(ch)
            token = ""
            while True:
                resp = await stub.ListJobs(
                    cpb.ListJobsRequest(states=LIVE_STATES if live_only else [], page_size=500, page_token=token),
                    metadata=md, timeout=120,
                )  # fmt: skip
                out += resp.jobs
                token = resp.next_page_token
                if not token or (live_only and out):
                    return out

    def settle_all(self, timeout: float = 120) -> bool:
        deadline = time.monotonic() + timeout
        while self.jobs(live_only=True):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.3)
        return True

    def books_check(self) -> str:
        """`wallet_svc check` on the wallet's database: "" when it passes."""
        out = subprocess.run(
            [sys.executable, "-m", "wallet_svc", "check", "--db", str(self.net.root / "wallet.sqlite"),
             "--treasury-address", self.net.treasury],
            cwd=ROOT, capture_output=True, text=True, timeout=300,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        return "" if out.returncode == 0 else (out.stdout + out.stderr)[-2000:]


def _seconds(ts: Any) -> float:
    return float(ts.seconds) + ts.nanos / 1e9


def _ms(xs: list[float]) -> tuple[float, float]:
    return percentile(xs, 0.5) * 1e3, percentile(xs, 0.99) * 1e3


def _window(rig: Rig, name: str, per_worker: list[dict[str, Any] | None], opts: Options) -> tuple[
    Sample, Sample, list[dict[str, Any]]
]:  # fmt: skip
    """Run a phase on the workers, sampling CPU over its measured window."""
    sent = rig.send(name, per_worker)
    time.sleep(opts.warmup)
    a = rig.sample()
    acc0 = sum(rig.shared.accepted)
    time.sleep(opts.window)
    b = rig.sample()
    b.verified = sum(rig.shared.accepted) - acc0
    return a, b, rig.recv(sent, timeout=opts.warmup + opts.window + 300)


def _cpu(a: Sample, b: Sample, jobs: int) -> dict[str, float]:
    span = b.mono - a.mono
    gen = [y - x for x, y in zip(a.generator, b.generator, strict=True)]
    per = 1e6 / jobs if jobs else float("nan")
    return {
        "cpu_us": (b.coordinator - a.coordinator) * per,
        "cpu_pct": 100 * (b.coordinator - a.coordinator) / span,
        "wallet_us": (b.wallet - a.wallet) * per,
        "gen_us": sum(gen) * per,
        "gen_pct_max": 100 * max(gen) / span,
        "pg_us": (b.postgres - a.postgres) * per,
    }


def load_run(
    kind: str, opts: Options, miners: int, store: str = "sqlite", replicas: int = 1,
    pg: TempPostgres | None = None, check_books: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """One run of the load scenario; its figures and what went wrong."""
    problems: list[str] = []
    with Rig(kind, opts, store, replicas, opts.workers, pg) as rig:
        specs = rig.add_miners(miners)
        welcomed, connect_s, errors = rig.connect(specs)
        if welcomed < miners:
            problems.append(f"only {welcomed} of {miners} miners welcomed: {errors}")
        base = {"targets": rig.targets, "token": rig.client_token, "n": opts.n}
        seconds = opts.warmup + opts.window

        # Saturation: a closed loop holding submitters x depth jobs in flight.
        share = rig.split(opts.submitters)
        a, b, sat = _window(rig, "closed_loop", [
            {**base, "submitters": s, "window": opts.submitters * opts.depth, "seconds": seconds} for s in share
        ], opts)  # fmt: skip
        verified_rate = b.verified / (b.mono - a.mono)
        if not rig.drain():
            problems.append("saturation: jobs still without a verdict 60 s after the load stopped")
        sat_ids = {j for g in sat for j in g}

        # Light load: one job at a time, from one submitter.
        light = rig.ask("one_at_a_time", [{**base, "seconds": opts.light}] + [None] * (rig.workers - 1))[0]
        rig.drain()

        # Open loop at 80 % of the saturation rate just measured.
        rate = max(1.0, 0.8 * verified_rate)
        c, d, paced = _window(rig, "paced", [
            {**base, "rate": rate / rig.workers, "seconds": seconds, "connections": 4} for _ in range(rig.workers)
        ], opts)  # fmt: skip
        if not rig.drain():
            problems.append("80 %: jobs still without a verdict 60 s after the load stopped")
        if not rig.settle_all():
            problems.append("jobs still unsettled 120 s after the last verdict")
        got = rig.collect()
        jobs = rig.jobs()
        books = rig.books_check() if check_books else ""
        if books:
            problems.append(f"wallet_svc check failed: {books}")

    settled = {j.job_id: j for j in jobs if j.state == cpb.JOB_STATE_SETTLED}
    unsettled = [j for j in jobs if j.state != cpb.JOB_STATE_SETTLED]
    if unsettled:
        states = sorted({cpb.JobState.Name(j.state) for j in unsettled})
        problems.append(f"{len(unsettled)} of {len(jobs)} jobs did not settle ({', '.join(states)})")
    if got["refusals"]:
        problems.append(f"results refused: {got['refusals'][:3]}")

    def settled_between(x: Sample, y: Sample) -> int:
        return sum(1 for j in settled.values() if x.wall <= _seconds(j.update_time) < y.wall)

    n_sat = settled_between(a, b)
    n_p80 = settled_between(c, d)
    assigned = got["assigned"]
    light_sub: dict[str, float] = light
    paced_sub: dict[str, float] = {k: v for g in paced for k, v in g["submitted"].items()}

    def dispatch(sub: dict[str, float]) -> list[float]:
        # Below 0 the assignment reached the miner before SubmitJob's answer
        # reached the client: no wait at all.
        return [max(0.0, assigned[j] - t) for j, t in sub.items() if j in assigned]

    def to_settled(ids: Any) -> list[float]:
        return [_seconds(settled[j].update_time) - _seconds(settled[j].create_time) for j in ids if j in settled]

    late = max(g["late_max"] for g in paced)
    if late > 0.05:
        problems.append(f"the 80 % pacer fell {late * 1e3:.0f} ms behind its schedule")
    gen_sat = _cpu(a, b, n_sat)
    if gen_sat["gen_pct_max"] > 90:
        problems.append(f"a load worker used {gen_sat['gen_pct_max']:.0f} % of a core: the load may be the limit")
    submitted = len(sat_ids) + len(light_sub) + len(paced_sub)
    if submitted != len(jobs):
        problems.append(f"{submitted} jobs submitted, {len(jobs)} listed")
    fig: dict[str, Any] = {
        "jobs": len(jobs),
        "submitted": submitted,
        "settled": len(settled),
        "unsettled": len(unsettled),
        "books": books,
        "welcomed": welcomed,
        "refused": len(got["refusals"]),
        "connect_s": connect_s,
        "rate": n_sat / (b.mono - a.mono),
        **gen_sat,
        "rate80_target": rate,
        "rate80": n_p80 / (d.mono - c.mono),
        "cpu80_us": _cpu(c, d, n_p80)["cpu_us"],
        "cpu80_pct": _cpu(c, d, n_p80)["cpu_pct"],
        "light_n": len(light_sub),
        "problems": problems,
        "submit_errors": got["submit_errors"],
    }
    fig["light_p50"], fig["light_p99"] = _ms(dispatch(light_sub))
    fig["p80_p50"], fig["p80_p99"] = _ms(dispatch(paced_sub))
    fig["s2s_light_p50"], fig["s2s_light_p99"] = _ms(to_settled(light_sub))
    fig["s2s_p80_p50"], fig["s2s_p80_p99"] = _ms(to_settled(paced_sub))
    return fig


def queue_run(kind: str, opts: Options) -> dict[str, Any]:
    """QUEUE_JOBS jobs waiting with no miner; then QUEUE_MINERS join. Filling
    the queue takes minutes, so one run measures WINDOWS windows."""
    problems: list[str] = []
    with Rig(kind, opts, workers=opts.workers) as rig:
        specs = rig.add_miners(opts.queue_miners)
        base = {"targets": rig.targets, "token": rig.client_token, "n": opts.n}
        t0 = time.monotonic()
        got = rig.ask("burst", [{**base, "count": c, "concurrency": 16} for c in rig.split(opts.queue_jobs)])
        fill_s = time.monotonic() - t0
        submitted = sum(len(g) for g in got)
        if submitted < opts.queue_jobs:
            problems.append(f"only {submitted} of {opts.queue_jobs} jobs were accepted")
        time.sleep(1.0)
        idle = []
        for _ in range(opts.windows):
            a = rig.sample()
            time.sleep(opts.window / 2)
            b = rig.sample()
            idle.append(100 * (b.coordinator - a.coordinator) / (b.mono - a.mono))
        rss_queue = rig.rss()
        # Miners join: the first assignment comes as soon as the coordinator
        # sees the first of them.
        joined = time.monotonic()
        rig.connect(specs, timeout=120)
        time.sleep(opts.warmup)
        windows: list[tuple[Sample, Sample]] = []
        for _ in range(opts.windows):
            c = rig.sample()
            end = c.mono + opts.window
            # A window ends early if the queue runs dry (the baseline's may).
            while time.monotonic() < end and sum(rig.shared.accepted) < submitted:
                time.sleep(0.01)
            windows.append((c, rig.sample()))
        got2 = rig.collect()
        first = min(got2["assigned"].values(), default=float("nan")) - joined
    acks = sorted(got2["acks"])
    rates, cpus = [], []
    for c, d in windows:
        n = sum(1 for t in acks if c.mono <= t <= d.mono)
        if n >= 10 and d.mono - c.mono >= 1.0:
            rates.append(n / (d.mono - c.mono))
            cpus.append((d.coordinator - c.coordinator) * 1e6 / n)
    if len(rates) < len(windows):
        problems.append(f"the queue ran dry: {len(rates)} of {len(windows)} drain windows measured")
    if not rates and len(acks) > 1 and acks[-1] > acks[0]:
        rates.append((len(acks) - 1) / (acks[-1] - acks[0]))  # the whole drain, warm-up and all
    if got2["refusals"]:
        problems.append(f"results refused: {got2['refusals'][:3]}")
    fig = {
        "fill_rate": submitted / fill_s,
        "fill_s": fill_s,
        "idle_pct": median(idle),
        "idle_windows": idle,
        "rss_queue": rss_queue,
        "first_ms": first * 1e3,
        "drain_rate": median(rates),
        "drain_windows": rates,
        "drain_cpu_us": median(cpus),
        "problems": problems,
    }
    return fig


def idle_run(kind: str, opts: Options) -> dict[str, Any]:
    """IDLE_MINERS miners connected, heartbeats only; then a trickle of jobs.
    Connecting them takes minutes, so one run measures WINDOWS windows."""
    problems: list[str] = []
    with Rig(kind, opts, workers=opts.idle_workers) as rig:
        rss0 = rig.rss()
        specs = rig.add_miners(opts.idle_miners)
        welcomed, connect_s, errors = rig.connect(specs, timeout=opts.idle_connect)
        if welcomed < opts.idle_miners:
            problems.append(
                f"only {welcomed:,} of {opts.idle_miners:,} miners were in within {opts.idle_connect:.0f} s "
                f"(the rest gave up: {errors[:2]}); RSS and CPU are for {welcomed:,}, and scaled to "
                f"{opts.idle_miners:,} beside them"
            )
        # Every miner beats once (5 s apart, random phase) before the window.
        time.sleep(6.0)
        windows = []
        for _ in range(opts.windows):
            a, beats0 = rig.sample(), sum(rig.shared.beats)
            time.sleep(opts.window)
            b, beats = rig.sample(), sum(rig.shared.beats) - beats0
            span = b.mono - a.mono
            used = b.coordinator - a.coordinator
            windows.append({
                "hb_pct": 100 * used / span,
                "hb_us": used * 1e6 / max(1, beats),
                "beats_per_s": beats / span,
                "rss": rig.rss(),
                "gen_pct_max": 100 * max(y - x for x, y in zip(a.generator, b.generator, strict=True)) / span,
            })  # fmt: skip
        base = {"targets": rig.targets, "token": rig.client_token, "n": opts.n, "connections": 1}
        secs = opts.trickle / opts.trickle_rate
        got = rig.ask("paced", [{**base, "rate": opts.trickle_rate, "seconds": secs}] + [None] * (rig.workers - 1))
        if not rig.drain(timeout=120):
            problems.append("trickled jobs still without a verdict 120 s after the last")
        gotc = rig.collect()
        if gotc["streams_ended"]:
            problems.append(f"miner streams ended: {gotc['streams_ended'][:3]}")
    sub = got[0]["submitted"]
    lat = [max(0.0, gotc["assigned"][j] - t) for j, t in sub.items() if j in gotc["assigned"]]
    if len(lat) < len(sub):
        problems.append(f"{len(sub) - len(lat)} of {len(sub)} trickled jobs never reached a miner")
    fig: dict[str, Any] = {k: median([w[k] for w in windows]) for k in windows[0]}
    if fig["hb_pct"] > 90:
        problems.append(
            f"the coordinator spent {fig['hb_pct']:.0f} % of a core on heartbeats and did not keep up with them: "
            "its CPU per heartbeat is counted per heartbeat sent, a floor"
        )
    fig.update(welcomed=welcomed, connect_s=connect_s, rss0=rss0, windows=windows, problems=problems)
    # What the aims ask about, where fewer miners got in: memory per miner
    # and CPU per heartbeat, times the count, at the default 5 s interval.
    fig["rss_full"] = rss0 + (fig["rss"] - rss0) * opts.idle_miners / max(1, welcomed)
    fig["hb_pct_full"] = fig["hb_us"] * opts.idle_miners / 5.0 / 1e4
    fig["p50"], fig["p99"] = _ms(lat)
    return fig


# -- the whole bench -------------------------------------------------------


@dataclass
class Row:
    name: str
    aitbc: list[dict[str, Any]]
    baseline: list[dict[str, Any]]

    def med(self, who: str, key: str) -> float:
        return median([r.get(key, math.nan) for r in getattr(self, who)])

    def runs(self, who: str, key: str, digits: int = 0) -> str:
        return ", ".join(_f(r.get(key, math.nan), digits) for r in getattr(self, who))

    def problems(self) -> list[str]:
        return [f"{who}: {p}" for who in ("aitbc", "baseline") for r in getattr(self, who) for p in r["problems"]]


def _repeat(runs: int, what: str, fn: Callable[[], dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for i in range(runs):
        t = time.monotonic()
        try:
            r = fn()
        except Exception as exc:
            print(f"  {what} run {i + 1}: FAILED {type(exc).__name__}: {exc}", flush=True)
            r = {"problems": [f"run failed: {type(exc).__name__}: {str(exc)[:300]}"]}
        out.append(r)
        shown = {k: (round(v, 1) if isinstance(v, float) else v) for k, v in r.items() if k != "problems"}
        print(f"  {what} run {i + 1} ({time.monotonic() - t:.0f} s): {shown}", flush=True)
        for p in r.get("problems", []):
            print(f"    ! {p}", flush=True)
    return out


def calibrate() -> float:
    """ms of CPU a fixed pure-Python loop takes: how much of a core this
    process gets, for comparing runs on busy and quiet machines."""
    start = time.process_time()
    total = 0
    for i in range(2_000_000):
        total += i % 7
    return (time.process_time() - start) * 1e3


def run(opts: Options) -> dict[str, Any]:
    """Every scenario, AITBC's coordinator and the baseline in turn."""
    started = time.monotonic()
    load0, cal0 = os.getloadavg()[0], calibrate()
    results: dict[str, Any] = {"opts": opts, "load": [], "skipped": []}
    for miners in opts.miners:
        print(f"sqlite, {miners} miners", flush=True)
        results["load"].append(Row(
            f"SQLite, {miners} miner{'s' if miners > 1 else ''}",
            _repeat(opts.runs, "aitbc", lambda m=miners: load_run("aitbc", opts, m)),  # type: ignore[misc]
            _repeat(opts.runs, "baseline", lambda m=miners: load_run("baseline", opts, m)),  # type: ignore[misc]
        ))  # fmt: skip
    pg: TempPostgres | None = None
    if opts.postgres:
        try:
            pg = TempPostgres().start()
        except PostgresUnavailable as exc:
            results["skipped"].append(f"PostgreSQL: not run, the server did not start here ({exc})")
    try:
        for replicas in (1, 2) if pg else ():
            print(f"postgres, {replicas} replica(s), {opts.pg_miners} miners", flush=True)
            results["load"].append(Row(
                f"PostgreSQL, {replicas} replica{'s' if replicas > 1 else ''}, {opts.pg_miners} miners",
                _repeat(opts.runs, "aitbc", lambda r=replicas: load_run(  # type: ignore[misc]
                    "aitbc", opts, opts.pg_miners, "postgres", r, pg)),
                [],
            ))  # fmt: skip
    finally:
        if pg:
            pg.stop()
    print(f"queue of {opts.queue_jobs} jobs, then {opts.queue_miners} miners", flush=True)
    results["queue"] = Row(
        "queue", _repeat(1, "aitbc", lambda: queue_run("aitbc", opts)),
        _repeat(1, "baseline", lambda: queue_run("baseline", opts)),
    )  # fmt: skip
    print(f"{opts.idle_miners} idle miners", flush=True)
    results["idle"] = Row(
        "idle", _repeat(1, "aitbc", lambda: idle_run("aitbc", opts)),
        _repeat(1, "baseline", lambda: idle_run("baseline", opts)),
    )  # fmt: skip
    results["seconds"] = time.monotonic() - started
    results["load_avg"] = (load0, os.getloadavg()[0])
    results["calibration"] = (cal0, calibrate())
    return results


# -- the report -------------------------------------------------------------


def _f(x: float, digits: int = 0) -> str:
    if x != x:
        return "n/a"
    return f"{x:,.{digits}f}"


def _vs(row: Row, key: str, digits: int = 0, base_row: Row | None = None) -> str:
    """AITBC's median, the baseline's, and their ratio."""
    mine = row.med("aitbc", key)
    b = (base_row or row).med("baseline", key) if (base_row or row).baseline else float("nan")
    if b != b:
        return f"**{_f(mine, digits)}**"
    if b <= 0 or round(b, digits) == 0:  # a ratio to nothing says nothing
        return f"**{_f(mine, digits)}** / {_f(b, digits)}"
    ratio = mine / b
    return f"**{_f(mine, digits)}** / {_f(b, digits)} ({_f(ratio, 2 if ratio < 10 else 0)}x)"


def section(results: dict[str, Any], machine: str) -> str:
    opts: Options = results["opts"]
    load: list[Row] = results["load"]
    base100 = next((r for r in load if r.name == "SQLite, 100 miners"), None)
    runs = f"{opts.runs} run{'s' if opts.runs > 1 else ''}"
    lines = [
        BEGIN,
        f"Measured {datetime.now(UTC):%Y-%m-%d} on {machine}; the whole run took {results['seconds'] / 60:.0f} min. "
        f"Load average {results['load_avg'][0]:.1f} at the start, {results['load_avg'][1]:.1f} at the end; a fixed "
        f"pure-Python loop took {results['calibration'][0]:.0f} / {results['calibration'][1]:.0f} ms of CPU at the "
        "start / end (the more, the more other work shared the cores: compare runs by it).",
        "",
        f"Each cell: **AITBC's coordinator** / the bare-bones baseline (bench/baseline.py) on the same load, and "
        f"their ratio; medians of {runs}, each on fresh processes and databases. matmul n = {opts.n} fp32; "
        f"saturation is {opts.submitters} submitters keeping {opts.submitters * opts.depth} jobs awaiting their "
        f"verdict; light load is one job at a time; 80 % is an open loop paced at 80 % of the saturation rate the "
        f"same run measured. {opts.window:g} s windows after {opts.warmup:g} s of warm-up; the default 5 s "
        f"heartbeat; {opts.workers} load processes; the wallet on SQLite in every row. Dispatch latency is "
        "SubmitJob's answer at the client to the assignment at a miner (0 when the assignment came first); "
        "submit→SETTLED is the job's own update_time − create_time.",
        "",
        "| scenario | settled jobs/s | coordinator CPU µs/job | dispatch p50 · p99 ms, light load "
        "| dispatch p50 · p99 ms at 80 % | submit→SETTLED p50 · p99 ms at 80 % | jobs/s, each run |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in load:
        br = row if row.baseline else base100
        lines.append(
            f"| {row.name} | {_vs(row, 'rate', 0, br)} | {_vs(row, 'cpu_us', 0, br)} "
            f"| {_vs(row, 'light_p50', 1, br)} · {_vs(row, 'light_p99', 1, br)} "
            f"| {_vs(row, 'p80_p50', 1, br)} · {_vs(row, 'p80_p99', 1, br)} "
            f"| {_vs(row, 's2s_p80_p50', 0, br)} · {_vs(row, 's2s_p80_p99', 0, br)} "
            f"| {row.runs('aitbc', 'rate')} / {row.runs('baseline', 'rate') if row.baseline else '—'} |"
        )
    lines += [
        "",
        "PostgreSQL rows stand beside the baseline's SQLite 100-miner figures: the baseline keeps no store. "
        "Where the CPU went at saturation (AITBC's runs, medians): the coordinator's share of one core (below "
        "100 %: it waited on the rest of the machine), and per settled job the wallet, the load generator and "
        "the PostgreSQL server; then the busiest load process's share of a core (near 100 %: the load, not the "
        "coordinator, set the pace).",
        "",
        "| scenario | coordinator % of a core | wallet µs/job | load generator µs/job | PostgreSQL µs/job "
        "| busiest load process % |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in load:
        pg = _f(row.med("aitbc", "pg_us")) if "PostgreSQL" in row.name else "—"
        lines.append(
            f"| {row.name} | {_f(row.med('aitbc', 'cpu_pct'))} | {_f(row.med('aitbc', 'wallet_us'))} "
            f"| {_f(row.med('aitbc', 'gen_us'))} | {pg} | {_f(row.med('aitbc', 'gen_pct_max'))} |"
        )
    q: Row = results["queue"]
    i: Row = results["idle"]
    got_in = i.med("aitbc", "welcomed")
    lines += [
        "",
        f"The queue and idle scenarios are one run each (filling the queue and connecting the miners take "
        f"minutes); their figures are medians of {opts.windows} windows within it.",
        "",
        "| scenario | figure | AITBC / baseline (ratio) | AITBC's windows |",
        "| --- | --- | --- | --- |",
        f"| {opts.queue_jobs:,} jobs queued, no miner | jobs/s submitted, filling the queue | "
        f"{_vs(q, 'fill_rate')} | — |",
        f"| | coordinator CPU while they wait, % of a core | {_vs(q, 'idle_pct', 1)} | {_wins(q, 'idle_windows', 1)} |",
        f"| | coordinator RSS with the queue, MiB | {_vs(q, 'rss_queue')} | — |",
        f"| then {opts.queue_miners} miners join | first assignment after they begin to connect, ms | "
        f"{_vs(q, 'first_ms')} | — |",
        f"| | verified jobs/s, draining the queue | {_vs(q, 'drain_rate')} | {_wins(q, 'drain_windows')} |",
        f"| | coordinator CPU µs per job, draining | {_vs(q, 'drain_cpu_us')} | — |",
        f"| {opts.idle_miners:,} idle miners ({_f(got_in)} got in) | coordinator RSS, MiB | {_vs(i, 'rss')} | "
        f"{_wins(i, 'windows', 0, 'rss')} |",
        f"| | coordinator CPU on heartbeats alone, % of a core | {_vs(i, 'hb_pct', 1)} | "
        f"{_wins(i, 'windows', 1, 'hb_pct')} |",
        f"| | coordinator CPU per heartbeat, µs | {_vs(i, 'hb_us')} | {_wins(i, 'windows', 0, 'hb_us')} |",
        f"| | dispatch p50 · p99 ms, {opts.trickle} jobs at {opts.trickle_rate:g}/s meanwhile | {_vs(i, 'p50', 1)} · "
        f"{_vs(i, 'p99', 1)} | — |",
        f"| | seconds until the last miner got in | {_vs(i, 'connect_s', 1)} | — |",
        "",
        *aims(results),
    ]
    problems = [f"{r.name}: {p}" for r in [*load, q, i] for p in r.problems()]
    if problems or results["skipped"]:
        lines += ["", "Not measured, or measured with a problem:", ""]
        lines += [f"- {p}" for p in [*results["skipped"], *problems]]
    lines.append(END)
    return "\n".join(lines)


def _wins(row: Row, key: str, digits: int = 0, sub: str = "") -> str:
    """The windows of AITBC's one run."""
    if not row.aitbc or key not in row.aitbc[0]:
        return "—"
    return ", ".join(_f(w[sub] if sub else w, digits) for w in row.aitbc[0][key])


def aims(results: dict[str, Any]) -> list[str]:
    """The issue's aims against this run's medians."""
    out = ["| aim (issue #15) | measured (median) | met |", "| --- | --- | --- |"]

    def line(aim: str, value: float, ok: bool, unit: str = "", digits: int = 0, note: str = "") -> None:
        shown = "n/a" if value != value else f"{_f(value, digits)}{unit}{note}"
        out.append(f"| {aim} | {shown} | {'yes' if ok else '**no**'} |")

    r100 = next((r for r in results["load"] if r.name == "SQLite, 100 miners"), None)
    if r100:
        rate = r100.med("aitbc", "rate")
        line("≥ 1,000 settled jobs/s with 100 miners", rate, rate >= AIM_RATE_100, " jobs/s")
        cpu = r100.med("aitbc", "cpu_us")
        line("≤ 1 ms coordinator CPU per job", cpu, cpu <= AIM_CPU_US, " µs")
        p50, p99 = r100.med("aitbc", "p80_p50"), r100.med("aitbc", "p80_p99")
        line("dispatch p50 ≤ 5 ms at 80 % of saturation (100 miners)", p50, p50 <= AIM_P50_MS, " ms", 1)
        line("dispatch p99 ≤ 25 ms at 80 % of saturation (100 miners)", p99, p99 <= AIM_P99_MS, " ms", 1)
    idle: Row = results["idle"]
    n = results["opts"].idle_miners
    got_in = idle.med("aitbc", "welcomed")
    scaled = got_in < n
    note = f" (scaled from the {_f(got_in)} that got in)" if scaled else ""
    rss = idle.med("aitbc", "rss_full" if scaled else "rss")
    hb = idle.med("aitbc", "hb_pct_full" if scaled else "hb_pct")
    line(f"{n:,} connected miners: coordinator RSS < 1 GiB", rss, rss < AIM_IDLE_RSS_MIB, " MiB", 0, note)
    line(f"{n:,} connected miners: heartbeats < 5 % of a core", hb, hb < AIM_IDLE_CPU_PCT, " %", 1, note)
    pg1 = next((r for r in results["load"] if r.name.startswith("PostgreSQL, 1 ")), None)
    pg2 = next((r for r in results["load"] if r.name.startswith("PostgreSQL, 2 ")), None)
    if pg1 and pg2:
        one, two = pg1.med("aitbc", "rate"), pg2.med("aitbc", "rate")
        line("PostgreSQL, one replica: ≥ 300 jobs/s", one, one >= AIM_PG_RATE, " jobs/s")
        line("PostgreSQL, two replicas: ≥ 1.6x one", two / one if one else float("nan"),
             bool(one) and two >= AIM_PG_SCALE * one, "x", 2)  # fmt: skip
    return out


def main(argv: list[str]) -> str | None:
    """The section for BENCHMARKS.md, or None for a --quick run (printed only)."""
    # A plain kill still stops every process the bench started (Rig.__exit__).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    quick = "--quick" in argv
    opts = QUICK if quick else Options()
    for arg in argv:
        if arg.startswith("--runs="):
            opts = replace(opts, runs=int(arg.split("=", 1)[1]))
    from bench.__main__ import machine

    results = run(opts)
    text = section(results, machine())
    print(text)
    return None if quick else text


if __name__ == "__main__":
    main(sys.argv[1:])
