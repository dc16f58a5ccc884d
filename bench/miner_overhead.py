"""What the sidecar adds to a job: the same matmuls run by the full stack
(assignment pushed, worker process, receipt signed, 9 MiB output streamed
back) against a bare loop calling the same torch code in one process."""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import grpc

from aitbc.localnet import ROOT, make_network
from aitbc.v1 import coordinator_pb2 as cpb
from aitbc.v1 import coordinator_pb2_grpc, wallet_pb2, wallet_pb2_grpc, workloads_pb2

N, REPEATS, JOBS = 1536, 60, 7

BARE = f"""
import time, sys
from pathlib import Path
from aitbc.workloads.matmul import MatmulParams
from miner_svc._run_matmul import run_matmul
p = MatmulParams(n={N}, dtype="fp32", seed=1, repeats={REPEATS})
run_matmul(p, "cpu", Path(sys.argv[1]))  # warm-up, as the sidecar's worker is warm
for i in range({JOBS}):
    t = time.perf_counter()
    run_matmul(MatmulParams(n={N}, dtype="fp32", seed=i + 2, repeats={REPEATS}), "cpu", Path(sys.argv[1]))
    print(time.perf_counter() - t, flush=True)
"""


def bare_seconds() -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(
            [sys.executable, "-c", BARE, str(Path(tmp) / "c.bin")],
            cwd=ROOT, capture_output=True, text=True, check=True, timeout=600,
        )  # fmt: skip
    return [float(x) for x in out.stdout.split()]


async def sidecar_seconds() -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        net = make_network(Path(tmp) / "net")
        try:
            net.start_wallet()
            net.start_coordinator()
            net.start_miner()
            md: Any = (("authorization", f"Bearer {net.ids['client'].token}"),)
            admin: Any = (("authorization", f"Bearer {net.ids['admin'].token}"),)
            async with grpc.aio.insecure_channel(net.wallet_target) as wch:
                await wallet_pb2_grpc.WalletServiceStub(wch).Mint(
                    wallet_pb2.MintRequest(address=net.ids["client"].address, amount=10**12, request_id="b"),
                    metadata=admin,
                )
            times = []
            async with grpc.aio.insecure_channel(net.coord_target) as ch:
                stub = coordinator_pb2_grpc.CoordinatorServiceStub(ch)
                for i in range(JOBS + 1):  # the first warms the worker, like the bare loop's
                    spec = cpb.JobSpec(
                        matmul=workloads_pb2.MatmulParams(
                            n=N, dtype=workloads_pb2.DTYPE_FP32, seed=i + 1, repeats=REPEATS
                        ),
                        max_price=10**9,
                    )
                    job = (await stub.SubmitJob(cpb.SubmitJobRequest(spec=spec, request_id=f"b{i}"), metadata=md)).job
                    stamps: dict[int, float] = {}
                    async for ev in stub.WatchJob(cpb.WatchJobRequest(job_id=job.job_id), metadata=md):
                        stamps.setdefault(ev.job.state, ev.job.update_time.ToNanoseconds() / 1e9)
                    if i:
                        times.append(stamps[cpb.JOB_STATE_VERIFYING] - stamps[cpb.JOB_STATE_ASSIGNED])
            return times
        finally:
            net.stop_all()


def run() -> dict[str, Any]:
    bare = bare_seconds()
    side = asyncio.run(sidecar_seconds())
    b, s = statistics.median(bare), statistics.median(side)
    row = {"bare": b, "sidecar": s, "overhead": s / b - 1, "bare_runs": bare, "sidecar_runs": side}
    print(f"matmul n={N} x{REPEATS}: bare {b:.3f} s, through the sidecar {s:.3f} s, overhead {row['overhead']:+.1%}")
    return row
