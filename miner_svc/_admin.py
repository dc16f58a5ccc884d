"""MinerAdminService: the sidecar's loopback admin API (GetStatus, Drain)."""

from __future__ import annotations

import asyncio

import grpc

from aitbc.auth import Principal, TokenTable, hash_token
from aitbc.server import Service
from aitbc.v1 import miner_pb2, miner_pb2_grpc
from miner_svc._agent import MinerAgent


class MinerAdminServicer(miner_pb2_grpc.MinerAdminServiceServicer):
    def __init__(self, agent: MinerAgent, terminate: asyncio.Event) -> None:
        self._agent = agent
        self._terminate = terminate

    async def GetStatus(
        self, request: miner_pb2.GetStatusRequest, context: grpc.aio.ServicerContext
    ) -> miner_pb2.GetStatusResponse:
        a = self._agent
        hello = a.hello()
        heartbeat = a.heartbeat_message().heartbeat
        jobs = [
            miner_pb2.MinerJob(
                job_id=a.job_of.get(lease, ""), lease_id=lease, finished=lease in a.finished_leases(),
                progress=a.progress_of.get(lease, 0.0),
            )
            for lease in sorted(set(a.running_leases()) | set(a.finished_leases()))
        ]  # fmt: skip
        return miner_pb2.GetStatusResponse(
            miner_id=hello.miner_id,
            accel=hello.capabilities.accel,
            gpus=hello.capabilities.gpus,
            telemetry=heartbeat.telemetry,
            connected=a.connected,
            coordinator=a.config.coord_url,
            jobs=jobs,
            slots=hello.capabilities.slots,
            earned_uait=a.earned,
            reputation=a.reputation,
            models=sorted(a.config.models),
            draining=a.draining,
            payout_address=hello.payout_address,
            start_time=a.start_time,
        )

    async def Drain(
        self, request: miner_pb2.DrainRequest, context: grpc.aio.ServicerContext
    ) -> miner_pb2.DrainResponse:
        self._terminate.set()
        return miner_pb2.DrainResponse(running=len(self._agent.running_leases()))


def build_admin(agent: MinerAgent, terminate: asyncio.Event, api_key: str, port: int) -> Service:
    """Loopback only; the owner authenticates with the sidecar's API_KEY."""
    owner = Principal("local-owner", "miner", miner_id=agent.config.miner_id)
    servicer = MinerAdminServicer(agent, terminate)
    return Service(
        services=[miner_pb2.DESCRIPTOR.services_by_name["MinerAdminService"]],
        register=[lambda s: miner_pb2_grpc.add_MinerAdminServiceServicer_to_server(servicer, s)],
        tokens=TokenTable({hash_token(api_key): owner}),
        host="127.0.0.1",
        port=port,
    )
