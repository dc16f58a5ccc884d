"""Hostile parties against miner identity, token revocation and leases,
each tried from the proto as an attacker would: a miner token that names no
miner id, one miner claiming another's id, a revoked or expired token on an
open stream (and its racing result), a miner that heartbeats but never
finishes, and refusals at the gate that must never read INTERNAL."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator

import grpc
import pytest

from aitbc.rpc import error_reason
from aitbc.v1 import coordinator_pb2 as cpb
from aitbc.v1 import coordinator_pb2_grpc
from tests.conftest import Network

pytestmark = pytest.mark.timeout(240)


async def refused_connect(channel: grpc.aio.Channel, token: str | None) -> tuple[str, str]:
    """A Connect that says hello and waits, as a sidecar does."""
    metadata = (("authorization", f"Bearer {token}"),) if token else ()

    async def requests() -> AsyncIterator[cpb.ConnectRequest]:
        yield cpb.ConnectRequest(hello=cpb.MinerHello(miner_id="anyone"))
        await asyncio.sleep(30)

    call = coordinator_pb2_grpc.MinerGatewayServiceStub(channel).Connect(requests(), metadata=metadata, timeout=20)
    try:
        async for _ in call:
            pass
    except grpc.aio.AioRpcError as err:
        return err.code().name, error_reason(err)
    return "OK", ""


async def test_connect_refused_at_the_gate_is_never_internal(network: Network) -> None:
    """The refusal races the caller's hello: grpc's client reported INTERNAL
    for a few percent of such calls until the gate waited for the hello."""
    network.start_wallet()
    network.start_coordinator()
    seen: collections.Counter[tuple[str, str]] = collections.Counter()
    async with grpc.aio.insecure_channel(network.coord_target) as channel:
        for token in (None, network.ids["client"].token):
            for _ in range(4):
                seen.update(await asyncio.gather(*(refused_connect(channel, token) for _ in range(50))))
    assert seen == {
        ("UNAUTHENTICATED", "MISSING_TOKEN"): 200,
        ("PERMISSION_DENIED", "ROLE_NOT_ALLOWED"): 200,
    }, seen
