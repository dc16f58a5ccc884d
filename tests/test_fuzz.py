"""Random and mutated messages at every RPC of the wallet and the
coordinator, as a caller the RPC admits: a few thousand cases. Nothing a
client sends may yield INTERNAL (or UNKNOWN), crash a service, or leave it
unhealthy or its books unbalanced."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aitbc.addresses import address_of
from aitbc.crypto import KeyPair
from aitbc.v1 import coordinator_pb2, wallet_pb2
from tests.conftest import ROOT, Network, make_network
from tests.test_authz import EXPECTED

pytestmark = pytest.mark.timeout(600)

LIMITS = ("--rate-limits", "client=100000,miner=100000,admin=100000")
METHODS: list[tuple[str, MethodDescriptor]] = [
    ("wallet", m) for m in wallet_pb2.DESCRIPTOR.services_by_name["WalletService"].methods
] + [
    ("coordinator", m)
    for name in ("CoordinatorService", "MinerGatewayService", "CoordinatorAdminService")
    for m in coordinator_pb2.DESCRIPTOR.services_by_name[name].methods
]
INTS = st.one_of(st.integers(-3, 3), st.integers(-(2**63), 2**63 - 1))
# Valid addresses in the pool, so that content past the format checks gets
# exercised too (mints, holds, balances of real-looking accounts).
ADDRESSES = [address_of(KeyPair.generate().public_key) for _ in range(3)]
TEXT = st.one_of(
    st.text(max_size=40), st.sampled_from(["", "job_1", "ait_", "x" * 300, "../../etc", "DTYPE_FP32", *ADDRESSES])
)


def fill(msg: Any, data: st.DataObject, depth: int = 0) -> Any:
    """Set a random subset of the message's fields to random values of
    their types (nested messages down to depth 3, lists of up to 3)."""
    desc: Descriptor = msg.DESCRIPTOR
    for f in desc.fields:
        if not data.draw(st.booleans()):
            continue
        repeated = f.is_repeated
        count = data.draw(st.integers(1, 3)) if repeated else 1
        for _ in range(count):
            if f.type == FieldDescriptor.TYPE_MESSAGE:
                if depth >= 3 or f.message_type is None or f.message_type.GetOptions().map_entry:
                    break
                sub = getattr(msg, f.name).add() if repeated else getattr(msg, f.name)
                if not repeated:
                    sub.SetInParent()
                fill(sub, data, depth + 1)
                continue
            value = scalar(f, data)
            try:
                if repeated:
                    getattr(msg, f.name).append(value)
                else:
                    setattr(msg, f.name, value)
            except (ValueError, TypeError):
                pass  # out of this field's range: the mutations cover bad wire values
    return msg


def scalar(f: FieldDescriptor, data: st.DataObject) -> Any:
    t = f.type
    if t == FieldDescriptor.TYPE_STRING:
        return data.draw(TEXT)
    if t == FieldDescriptor.TYPE_BYTES:
        return data.draw(st.binary(max_size=80))
    if t == FieldDescriptor.TYPE_BOOL:
        return data.draw(st.booleans())
    if t in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return data.draw(st.floats(allow_nan=True, allow_infinity=True, width=32))
    if t == FieldDescriptor.TYPE_ENUM:
        return data.draw(st.integers(-2, 12))
    return data.draw(INTS)


def mutate(raw: bytes, data: st.DataObject) -> bytes:
    b = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "insert", "truncate", "delete"]))
        if op == "insert" or not b:
            b.insert(data.draw(st.integers(0, len(b))), data.draw(st.integers(0, 255)))
        elif op == "flip":
            i = data.draw(st.integers(0, len(b) - 1))
            b[i] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "truncate":
            del b[data.draw(st.integers(0, len(b) - 1)) :]
        else:
            del b[data.draw(st.integers(0, len(b) - 1))]
    return bytes(b)


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Network]:
    n = make_network(tmp_path_factory.mktemp("fuzz"))
    try:
        n.start_wallet(*LIMITS)
        n.start_coordinator(*LIMITS)
        yield n
    finally:
        n.stop_all()


async def send(net: Network, service: str, method: MethodDescriptor, payload: bytes) -> grpc.StatusCode:
    path = f"/{method.containing_service.full_name}/{method.name}"
    role = sorted(EXPECTED[path])[0]
    who = {"client": "client", "miner": "miner", "admin": "admin", "coordinator": "coordinator"}[role]
    md = (("authorization", f"Bearer {net.ids[who].token}"),)
    target = net.wallet_target if service == "wallet" else net.coord_target
    async with grpc.aio.insecure_channel(target) as ch:
        try:
            if method.client_streaming:
                call = ch.stream_stream(path)(iter([payload]), metadata=md, timeout=5)
                async for _ in call:
                    pass
            elif method.server_streaming:
                async for _ in ch.unary_stream(path)(payload, metadata=md, timeout=3):
                    pass
            else:
                await ch.unary_unary(path)(payload, metadata=md, timeout=5)
        except grpc.aio.AioRpcError as err:
            return err.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("service", ["wallet", "coordinator"])
def test_random_and_mutated_messages_never_yield_internal(net: Network, service: str) -> None:
    methods = [m for s, m in METHODS if s == service]
    seen: dict[str, set[str]] = {}

    @settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(data=st.data())
    def case(data: st.DataObject) -> None:
        method = data.draw(st.sampled_from(methods))
        cls: Any = message_factory.GetMessageClass(method.input_type)
        kind = data.draw(st.sampled_from(["fields", "mutated", "random"]))
        if kind == "random":
            payload = data.draw(st.binary(max_size=200))
        else:
            payload = fill(cls(), data).SerializeToString()
            if kind == "mutated":
                payload = mutate(payload, data)
        code = asyncio.run(send(net, service, method, payload))
        seen.setdefault(method.name, set()).add(code.name)
        assert code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), (method.name, kind, payload[:200])

    case()
    print({k: sorted(v) for k, v in seen.items()})
    # A guard on the guard: the generator must reach past parsing and the
    # gate, so that content gets judged (accepted, or refused for what it
    # says), or this test would prove little.
    judged = {c for codes in seen.values() for c in codes} - {"INVALID_ARGUMENT", "UNAUTHENTICATED"}
    assert judged, seen

    async def health() -> int:
        target = net.wallet_target if service == "wallet" else net.coord_target
        async with grpc.aio.insecure_channel(target) as ch:
            resp = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
            return int(resp.status)

    assert asyncio.run(health()) == health_pb2.HealthCheckResponse.SERVING
    assert all(p.poll() is None for p in net.procs.values()), "a service died"
    if service == "wallet":
        out = subprocess.run(
            [sys.executable, "-m", "wallet_svc", "check", "--db", str(net.root / "wallet.sqlite"),
             "--treasury-address", net.treasury],
            cwd=ROOT, capture_output=True, text=True, timeout=60, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin"},
        )  # fmt: skip
        assert out.returncode == 0, out.stdout + out.stderr
