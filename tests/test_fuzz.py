"""Random and mutated messages at every RPC of the wallet and the
coordinator, as a caller the RPC admits: a few thousand cases, with every
integer's extremes, NaN and infinities, times out of range and unknown
fields at any depth; on the miner stream, a hello and then random messages.
Nothing a client or miner sends may yield INTERNAL (or UNKNOWN), crash a
service, or leave it unhealthy or its books unbalanced."""

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
# Each integer type's edges and the values around them, small counts and
# amounts (so that content gets past the range checks), then anything in range.
_RANGES = {
    FieldDescriptor.CPPTYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.CPPTYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.CPPTYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.CPPTYPE_UINT64: (0, 2**64 - 1),
}
_EDGES = [0, -1, 1, 2**31 - 1, -(2**31), 2**31, 2**32 - 1, 2**63 - 1, -(2**63), 2**63, 2**64 - 1]
INTS = {
    cpp: st.one_of(
        st.sampled_from([v for v in _EDGES if low <= v <= high]),
        st.integers(max(-3, low), 3),
        st.integers(1, 1_000_000),
        st.integers(low, high),
    )
    for cpp, (low, high) in _RANGES.items()
}
FLOATS = st.one_of(
    st.sampled_from([0.0, -0.0, float("nan"), float("inf"), float("-inf"), 3.4028234663852886e38, 1e-45]),
    st.floats(allow_nan=True, allow_infinity=True, width=32),
)
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
    if t == FieldDescriptor.TYPE_FLOAT:
        return data.draw(FLOATS)
    if t == FieldDescriptor.TYPE_DOUBLE:
        return data.draw(st.one_of(FLOATS, st.sampled_from([1.7976931348623157e308, 5e-324])))
    if t == FieldDescriptor.TYPE_ENUM:
        return data.draw(st.integers(-2, 12))
    return data.draw(INTS[f.cpp_type])


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def unknown_fields(data: st.DataObject) -> bytes:
    """One to three fields of numbers no message of ours declares, of every
    wire type: varint, 64-bit, length-delimited, 32-bit."""
    out = b""
    for _ in range(data.draw(st.integers(1, 3))):
        number = data.draw(st.integers(1000, 2**29 - 1))
        wire = data.draw(st.sampled_from([0, 1, 2, 5]))
        if wire == 0:
            value = varint(data.draw(st.integers(0, 2**64 - 1)))
        elif wire == 2:
            body = data.draw(st.binary(max_size=data.draw(st.sampled_from([16, 4096]))))
            value = varint(len(body)) + body
        else:
            value = data.draw(st.binary(min_size=8 if wire == 1 else 4, max_size=8 if wire == 1 else 4))
        out += varint(number << 3 | wire) + value
    return out


def with_unknown_fields(msg: Any, data: st.DataObject) -> Any:
    """Unknown fields on the message itself or on one of its set messages."""
    targets = [msg]
    todo = [msg]
    while todo:
        m = todo.pop()
        for f, value in m.ListFields():
            if f.type == FieldDescriptor.TYPE_MESSAGE and not f.message_type.GetOptions().map_entry:
                subs = list(value) if f.is_repeated else [value]
                targets += subs
                todo += subs
    data.draw(st.sampled_from(targets)).MergeFromString(unknown_fields(data))
    return msg


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


def message(method: MethodDescriptor, data: st.DataObject, kind: str = "") -> bytes:
    """A request of the method's type: fields filled, mutated on the wire,
    random bytes, or filled and carrying unknown fields."""
    kind = kind or data.draw(st.sampled_from(["fields", "mutated", "random", "unknown"]))
    if kind == "random":
        return data.draw(st.binary(max_size=200))
    msg = fill(message_factory.GetMessageClass(method.input_type)(), data)
    if kind == "unknown":
        msg = with_unknown_fields(msg, data)
    raw: bytes = msg.SerializeToString()
    return mutate(raw, data) if kind == "mutated" else raw


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Network]:
    n = make_network(tmp_path_factory.mktemp("fuzz"))
    try:
        n.start_wallet(*LIMITS)
        n.start_coordinator(*LIMITS)
        yield n
    finally:
        n.stop_all()


def hello(net: Network) -> bytes:
    """A hello the coordinator accepts from the miner identity the fuzz uses."""
    ident = net.ids["miner"]
    assert ident.key is not None
    return coordinator_pb2.ConnectRequest(
        hello=coordinator_pb2.MinerHello(
            miner_id=ident.principal.miner_id,
            public_key=ident.key.public_key,
            payout_address=ident.address,
            capabilities=coordinator_pb2.Capabilities(
                workloads=["matmul"], slots=1, accel=coordinator_pb2.ACCEL_KIND_CUDA,
                gpus=[coordinator_pb2.GpuInfo(index=0, memory_total_bytes=2**34)],
            ),
        )
    ).SerializeToString()  # fmt: skip


async def send(net: Network, service: str, method: MethodDescriptor, payload: bytes | list[bytes]) -> grpc.StatusCode:
    path = f"/{method.containing_service.full_name}/{method.name}"
    role = sorted(EXPECTED[path])[0]
    who = {"client": "client", "miner": "miner", "admin": "admin", "coordinator": "coordinator"}[role]
    md = (("authorization", f"Bearer {net.ids[who].token}"),)
    target = net.wallet_target if service == "wallet" else net.coord_target
    async with grpc.aio.insecure_channel(target) as ch:
        try:
            if method.client_streaming:
                messages = payload if isinstance(payload, list) else [payload]
                call = ch.stream_stream(path)(iter(messages), metadata=md, timeout=5)
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
        kinds = ["fields", "mutated", "random", "unknown"]
        # Half the miner streams open with a good hello, so that what
        # follows it is read as a connected miner's messages.
        kind = data.draw(st.sampled_from(kinds + ["stream"] * 4 if method.client_streaming else kinds))
        payload: bytes | list[bytes]
        if kind == "stream":
            payload = [hello(net)] + [message(method, data) for _ in range(data.draw(st.integers(1, 6)))]
        else:
            payload = message(method, data, kind)
        code = asyncio.run(send(net, service, method, payload))
        name = f"{method.name}+hello" if kind == "stream" else method.name
        seen.setdefault(name, set()).add(code.name)
        assert code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), (name, kind, str(payload)[:300])

    case()
    print({k: sorted(v) for k, v in seen.items()})
    # A guard on the guard: the generator must reach past parsing and the
    # gate, so that content gets judged (accepted, or refused for what it
    # says), or this test would prove little.
    judged = {c for codes in seen.values() for c in codes} - {"INVALID_ARGUMENT", "UNAUTHENTICATED"}
    assert judged, seen
    if service == "coordinator":
        # Streams past their hello ran to their end, random messages and all.
        assert "OK" in seen.get("Connect+hello", set()), seen

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
