"""`python -m miner_svc status`: the local sidecar's GPUs, jobs and earnings."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from aitbc.auth import auth_metadata
from aitbc.rpc import insecure_channel
from aitbc.v1 import coordinator_pb2 as cpb
from aitbc.v1 import miner_pb2, miner_pb2_grpc


def render(s: miner_pb2.GetStatusResponse) -> str:
    lines = [
        f"miner       {s.miner_id}  ({cpb.AccelKind.Name(s.accel).removeprefix('ACCEL_KIND_').lower()}, "
        f"{s.slots} slot{'s' if s.slots != 1 else ''}){'  DRAINING' if s.draining else ''}",
        f"coordinator {s.coordinator}  {'connected' if s.connected else 'NOT CONNECTED'}",
        f"payouts     {s.payout_address}",
        f"earned      {s.earned_uait / 1e6:,.6f} AIT since {s.start_time.ToDatetime():%Y-%m-%d %H:%M:%S} UTC",
        f"reputation  {s.reputation:.3f}" if s.reputation else "reputation  no verdict yet",
        f"models      {', '.join(s.models) if s.models else 'none (matmul only)'}",
    ]
    telemetry = {t.index: t for t in s.telemetry}
    for g in s.gpus:
        t = telemetry.get(g.index)
        memory = f"{t.memory_used_bytes / 2**30:5.1f}/{g.memory_total_bytes / 2**30:.0f} GiB" if t else ""
        state = (
            f"{t.utilization_percent:3d}% util, {memory}, {t.power_watts:5.0f} W, {t.temperature_celsius} °C"
            if t
            else "no telemetry"
        )
        lines.append(f"gpu {g.index}       {g.name}: {state}")
    if not s.gpus:
        lines.append("gpus        none (CPU mode)")
    for j in s.jobs:
        what = "finished, awaiting delivery" if j.finished else f"running {j.progress:4.0%}"
        lines.append(f"job         {j.job_id}  {what}")
    if not s.jobs:
        lines.append("jobs        none")
    return "\n".join(lines)


async def probe(port: int, api_key: str) -> tuple[bool, miner_pb2.GetStatusResponse | None]:
    """(whether a sidecar answers on the admin port, its status if it takes
    api_key). ADMIN_PORT=0 (the sidecar picked one) cannot be found."""
    if port == 0:
        return False, None
    async with insecure_channel(f"127.0.0.1:{port}") as ch:
        try:
            resp: miner_pb2.GetStatusResponse = await miner_pb2_grpc.MinerAdminServiceStub(ch).GetStatus(
                miner_pb2.GetStatusRequest(), metadata=auth_metadata(api_key), timeout=5
            )
        except grpc.aio.AioRpcError as err:
            # Only a refused connection means nobody is there; a slow answer
            # (a loaded host) is a sidecar that must not be stepped on.
            return err.code() != grpc.StatusCode.UNAVAILABLE, None
    return True, resp


def status(port: int, api_key: str) -> int:
    if port == 0:
        print("ADMIN_PORT=0: give the port the sidecar chose (its log's admin_listening line) with --admin-port")
        return 1

    async def fetch() -> Any:
        async with insecure_channel(f"127.0.0.1:{port}") as ch:
            return await miner_pb2_grpc.MinerAdminServiceStub(ch).GetStatus(
                miner_pb2.GetStatusRequest(), metadata=auth_metadata(api_key), timeout=5
            )

    try:
        print(render(asyncio.run(fetch())))
    except grpc.aio.AioRpcError as err:
        print(f"the sidecar's admin API on 127.0.0.1:{port} did not answer: {err.code().name} {err.details()}")
        return 1
    return 0
