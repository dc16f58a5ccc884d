"""`make soak`: minutes of steady load on a local network, its miners killed
and restarted now and then, with results kept only a minute. Every 10 s it
prints the coordinator's memory, open files and disk use; at the end it
checks them against the bounds below, that every job ended and was paid
once, and that the ledger audits clean. Exit 1 if anything is off.

Bounds, after a minute's warm-up (DECISIONS.md, "Soak"):
- the coordinator's resident memory grows by at most RSS_GROWTH_MIB;
- it holds at most MAX_FDS open files;
- the blob folder holds no more blobs than jobs that ended within the
  retention (and two sweeps) before the sample, plus a few in verification;
- the job store (SQLite file and its WAL) stays under MAX_DB_MIB.

SOAK_SECS (300) sets the length, SOAK_CLIENTS (4) the concurrent clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from aitbc.localnet import ROOT, Network, make_network
from aitbc.v1 import coordinator_pb2 as cpb
from aitbc.v1 import coordinator_pb2_grpc, wallet_pb2, wallet_pb2_grpc, workloads_pb2

SOAK_SECS = float(os.environ.get("SOAK_SECS", "300"))
CLIENTS = int(os.environ.get("SOAK_CLIENTS", "4"))
WARMUP_SECS = 60.0
KEEP_SECS, ROWS_SECS, SWEEP_SECS = 60.0, 120.0, 5.0
RSS_GROWTH_MIB = 64
MAX_FDS = 256
MAX_DB_MIB = 64
# Results in verification or settling when a sample is taken.
IN_FLIGHT = 8
MINERS = ("miner", "miner2", "miner3")
TERMINAL = {cpb.JOB_STATE_SETTLED, cpb.JOB_STATE_FAILED, cpb.JOB_STATE_CANCELLED, cpb.JOB_STATE_EXPIRED}
TRANSIENT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}


@dataclass
class Sample:
    at: float
    rss_mib: float
    fds: int
    blobs: int
    blob_mib: float
    db_mib: float
    recently_ended: int


@dataclass
class Soak:
    net: Network
    ended: list[tuple[float, cpb.Job]] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    kills: int = 0
    stop: asyncio.Event = field(default_factory=asyncio.Event)


def _md(net: Network, who: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {net.ids[who].token}"),)


async def client(soak: Soak, n: int) -> None:
    """Submit one small job at a time and follow it to its end."""
    net = soak.net
    async with grpc.aio.insecure_channel(net.coord_target) as ch:
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(ch)
        while not soak.stop.is_set():
            # A fresh seed each time: every output is its own blob.
            spec = cpb.JobSpec(
                matmul=workloads_pb2.MatmulParams(n=64, dtype=workloads_pb2.DTYPE_FP32, seed=random.getrandbits(48)),
                max_price=100_000,
            )
            request_id = f"soak-{n}-{secrets.token_hex(6)}"
            job_id = ""
            while not job_id:
                try:
                    resp = await stub.SubmitJob(
                        cpb.SubmitJobRequest(spec=spec, request_id=request_id), metadata=_md(net, "client"), timeout=10
                    )
                    job_id = resp.job.job_id
                except grpc.aio.AioRpcError as err:
                    if err.code() not in TRANSIENT:
                        raise
                    await asyncio.sleep(0.2)
            while True:
                await asyncio.sleep(0.2)
                try:
                    job = (await stub.GetJob(cpb.GetJobRequest(job_id=job_id), metadata=_md(net, "client"))).job
                except grpc.aio.AioRpcError as err:
                    if err.code() not in TRANSIENT:
                        raise
                    continue
                if job.state in TERMINAL:
                    soak.ended.append((time.monotonic(), job))
                    break


async def killer(soak: Soak) -> None:
    """Now and then SIGKILL a miner; bring it back within the reconnect
    grace or after it."""
    rng = random.Random(14)
    while not soak.stop.is_set():
        await asyncio.sleep(rng.uniform(15, 30))
        name = rng.choice(MINERS)
        soak.net.stop(name, signal.SIGKILL)
        soak.kills += 1
        await asyncio.sleep(rng.choice([1.0, 3.0, 8.0]))
        soak.net.start_miner(name, wait=False)


def measure(soak: Soak, start: float) -> Sample:
    net = soak.net
    pid = net.procs["coordinator"].pid
    rss = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) / 1024
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    sizes = []
    with os.scandir(net.root / "blobs") as entries:
        for entry in entries:
            with contextlib.suppress(FileNotFoundError):  # the sweep may take one meanwhile
                if entry.is_file():
                    sizes.append(entry.stat().st_size)
    db = sum(p.stat().st_size for p in net.root.glob("coordinator.sqlite*"))
    now = time.monotonic()
    window = KEEP_SECS + 2 * SWEEP_SECS + 5
    recent = sum(1 for at, job in soak.ended if now - at < window and job.state == cpb.JOB_STATE_SETTLED)
    return Sample(
        at=now - start, rss_mib=rss, fds=fds, blobs=len(sizes), blob_mib=sum(sizes) / 2**20,
        db_mib=db / 2**20, recently_ended=recent,
    )  # fmt: skip


async def sampler(soak: Soak, start: float) -> None:
    print(f"{'t (s)':>6} {'RSS MiB':>8} {'fds':>5} {'blobs':>6} {'blob MiB':>9} {'db MiB':>7} {'jobs':>6}", flush=True)
    while not soak.stop.is_set():
        s = measure(soak, start)
        soak.samples.append(s)
        print(f"{s.at:6.0f} {s.rss_mib:8.1f} {s.fds:5d} {s.blobs:6d} {s.blob_mib:9.2f} {s.db_mib:7.2f} "
              f"{len(soak.ended):6d}", flush=True)  # fmt: skip
        await asyncio.sleep(10)


async def balances(net: Network) -> dict[str, tuple[int, int]]:
    async with grpc.aio.insecure_channel(net.wallet_target) as ch:
        stub = wallet_pb2_grpc.WalletServiceStub(ch)
        out = {}
        for who in ("client", *MINERS):
            b = await stub.GetBalance(
                wallet_pb2.GetBalanceRequest(address=net.ids[who].address), metadata=_md(net, "admin"), timeout=10
            )
            out[who] = (b.available, b.held)
        b = await stub.GetBalance(
            wallet_pb2.GetBalanceRequest(address=net.treasury), metadata=_md(net, "admin"), timeout=10
        )
        out["treasury"] = (b.available, b.held)
        return out


async def soak(net: Network) -> list[str]:
    problems: list[str] = []
    try:
        net.start_wallet()
        net.start_coordinator(
            "--lease-secs", "3", "--heartbeat-secs", "0.5", "--reconnect-grace-secs", "5",
            "--rate-limits", "client=2000",
            "--result-retention-days", f"{KEEP_SECS / 86400:.9f}", "--job-retention-days", f"{ROWS_SECS / 86400:.9f}",
            "--retention-sweep-secs", str(SWEEP_SECS),
        )  # fmt: skip
        for name in MINERS:
            net.start_miner(name)
        minted = 10**12
        async with grpc.aio.insecure_channel(net.wallet_target) as ch:
            await wallet_pb2_grpc.WalletServiceStub(ch).Mint(
                wallet_pb2.MintRequest(address=net.ids["client"].address, amount=minted, request_id="soak"),
                metadata=_md(net, "admin"), timeout=10,
            )  # fmt: skip
        state = Soak(net)
        start = time.monotonic()
        tasks = [asyncio.create_task(client(state, i)) for i in range(CLIENTS)]
        tasks += [asyncio.create_task(killer(state)), asyncio.create_task(sampler(state, start))]
        await asyncio.sleep(SOAK_SECS)
        state.stop.set()
        # Clients finish the job each follows; the killer and sampler stop.
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=300)
        state.samples.append(measure(state, start))

        jobs = [job for _, job in state.ended]
        settled = [j for j in jobs if j.state == cpb.JOB_STATE_SETTLED]
        print(f"{len(jobs)} jobs ended in {SOAK_SECS:.0f} s ({len(settled)} settled), {state.kills} miner kills")
        if len(settled) < 0.95 * len(jobs):
            problems.append(f"only {len(settled)} of {len(jobs)} jobs settled")

        warm = [s for s in state.samples if s.at >= WARMUP_SECS]
        if warm:
            growth = max(s.rss_mib for s in warm) - warm[0].rss_mib
            print(f"RSS after warm-up {warm[0].rss_mib:.1f} MiB, grew {growth:.1f} MiB (bound {RSS_GROWTH_MIB})")
            if growth > RSS_GROWTH_MIB:
                problems.append(f"coordinator RSS grew {growth:.1f} MiB after warm-up")
        most_fds = max(s.fds for s in state.samples)
        print(f"open files at most {most_fds} (bound {MAX_FDS})")
        if most_fds > MAX_FDS:
            problems.append(f"coordinator held {most_fds} open files")
        for s in state.samples:
            if s.blobs > s.recently_ended + IN_FLIGHT:
                problems.append(f"at {s.at:.0f} s {s.blobs} blobs, {s.recently_ended} jobs within retention")
        most = max(state.samples, key=lambda s: s.blobs)
        print(f"blobs at most {most.blobs} ({most.blob_mib:.2f} MiB), in every sample no more than the jobs ended "
              "within the retention")  # fmt: skip
        most_db = max(s.db_mib for s in state.samples)
        print(f"job store at most {most_db:.2f} MiB (bound {MAX_DB_MIB})")
        if most_db > MAX_DB_MIB:
            problems.append(f"job store grew to {most_db:.1f} MiB")

        # Paid once: the books match what the jobs say, nothing held.
        want = {
            "client": (minted - sum(j.price for j in settled), 0),
            "treasury": (sum(j.fee_amount for j in settled), 0),
            **{
                name: (sum(j.miner_amount for j in settled if j.miner_id == net.ids[name].principal.miner_id), 0)
                for name in MINERS
            },
        }
        got: dict[str, tuple[int, int]] = {}
        for _ in range(60):
            got = await balances(net)
            if got == want:
                break
            await asyncio.sleep(1)
        if got != want:
            problems.append(f"books: want {want}, have {got}")
    finally:
        net.stop_all()
    return problems


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="aitbc-soak-") as tmp:
        root = Path(tmp) / "net"
        net = make_network(root)
        problems = asyncio.run(soak(net))
        check = subprocess.run(
            [sys.executable, "-m", "wallet_svc", "check", "--db", str(root / "wallet.sqlite"),
             "--treasury-address", net.treasury],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        if check.returncode != 0:
            problems.append(f"wallet_svc check: {check.stdout}{check.stderr}")
    for p in problems:
        print(f"FAIL {p}")
    print("soak: " + ("FAILED" if problems else "all bounds held"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
