"""Every RPC of every service, called as every role and with no token, an
expired token and a forged one: the outcome must match the role table.

The table is written out here, in plain sight, and checked against the
`allowed_roles` options the servers build their table from — so opening an
RPC to another role is a visible change to this file, and a server that let
a caller past its table fails the calls below."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor

from aitbc.auth import ROLE_NAMES, role_table
from aitbc.rpc import error_reason
from aitbc.v1 import coordinator_pb2, miner_pb2, wallet_pb2
from tests.conftest import ROOT, Network, eventually, make_network

pytestmark = pytest.mark.timeout(300)

EXPECTED: dict[str, set[str]] = {
    "/aitbc.v1.WalletService/CreateAccount": {"client", "miner", "admin"},
    "/aitbc.v1.WalletService/GetBalance": {"client", "miner", "admin", "coordinator"},
    "/aitbc.v1.WalletService/Mint": {"admin"},
    "/aitbc.v1.WalletService/PlaceHold": {"coordinator"},
    "/aitbc.v1.WalletService/SettleHold": {"coordinator"},
    "/aitbc.v1.WalletService/SettleHolds": {"coordinator"},
    "/aitbc.v1.WalletService/Transfer": {"client", "miner", "admin"},
    "/aitbc.v1.WalletService/ListTransactions": {"client", "miner", "admin"},
    "/aitbc.v1.WalletService/ReleaseHold": {"coordinator"},
    "/aitbc.v1.CoordinatorService/SubmitJob": {"client"},
    "/aitbc.v1.CoordinatorService/GetJob": {"client"},
    "/aitbc.v1.CoordinatorService/WatchJob": {"client"},
    "/aitbc.v1.CoordinatorService/ListJobs": {"client"},
    "/aitbc.v1.CoordinatorService/CancelJob": {"client"},
    "/aitbc.v1.CoordinatorService/GetJobResult": {"client"},
    "/aitbc.v1.MinerGatewayService/Connect": {"miner"},
    "/aitbc.v1.MinerGatewayService/RotateKey": {"miner"},
    "/aitbc.v1.CoordinatorAdminService/ResetMinerKey": {"admin"},
    "/aitbc.v1.MinerAdminService/GetStatus": {"miner"},
    "/aitbc.v1.MinerAdminService/Drain": {"miner"},
}
SERVICES = {
    "wallet": [wallet_pb2.DESCRIPTOR.services_by_name["WalletService"]],
    "coordinator": [
        coordinator_pb2.DESCRIPTOR.services_by_name["CoordinatorService"],
        coordinator_pb2.DESCRIPTOR.services_by_name["MinerGatewayService"],
        coordinator_pb2.DESCRIPTOR.services_by_name["CoordinatorAdminService"],
    ],
}
CALLERS = ["admin", "coordinator", "client", "miner", "none", "expired", "forged"]


def test_the_role_table_is_the_one_written_here() -> None:
    services = [
        *SERVICES["wallet"],
        *SERVICES["coordinator"],
        miner_pb2.DESCRIPTOR.services_by_name["MinerAdminService"],
    ]
    names: dict[int, str] = {int(v): k for k, v in ROLE_NAMES.items()}
    actual = {method: {names[r] for r in roles} for method, roles in role_table(services).items()}
    assert actual == EXPECTED


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Network]:
    n = make_network(tmp_path_factory.mktemp("authz"))
    try:
        n.start_wallet()
        n.start_coordinator()
        yield n
    finally:
        n.stop_all()


async def call(channel: grpc.aio.Channel, method: MethodDescriptor, token: str | None) -> grpc.StatusCode:
    """Call with an empty request; the status it ends with (OK included)."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    request_cls: Any = message_factory.GetMessageClass(method.input_type)
    response_cls: Any = message_factory.GetMessageClass(method.output_type)
    md = (("authorization", f"Bearer {token}"),) if token is not None else ()
    kw = {"request_serializer": request_cls.SerializeToString, "response_deserializer": response_cls.FromString}
    try:
        if method.client_streaming:
            stream = channel.stream_stream(path, **kw)(iter([request_cls()]), metadata=md, timeout=5)
            async for _ in stream:
                break
        elif method.server_streaming:
            async for _ in channel.unary_stream(path, **kw)(request_cls(), metadata=md, timeout=5):
                break
        else:
            await channel.unary_unary(path, **kw)(request_cls(), metadata=md, timeout=5)
    except grpc.aio.AioRpcError as err:
        reason = error_reason(err)
        call.last_reason = reason  # type: ignore[attr-defined]
        return err.code()
    call.last_reason = ""  # type: ignore[attr-defined]
    return grpc.StatusCode.OK


def token_of(net: Network, caller: str) -> str | None:
    if caller == "none":
        return None
    if caller == "forged":
        return "ait_tok_" + "A" * 43
    return net.ids[caller].token


def check(method: str, caller: str, code: grpc.StatusCode, reason: str, allowed: set[str]) -> None:
    where = f"{method} as {caller}: {code.name} {reason}"
    assert code != grpc.StatusCode.INTERNAL, where
    if caller == "none":
        assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "MISSING_TOKEN"), where
    elif caller == "forged":
        assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "BAD_TOKEN"), where
    elif caller == "expired":
        assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_EXPIRED"), where
    elif caller in allowed:
        # Past the gate: the empty request may well be refused, but for what
        # it says, never for who sent it.
        assert code != grpc.StatusCode.UNAUTHENTICATED, where
        assert reason != "ROLE_NOT_ALLOWED", where
    else:
        assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "ROLE_NOT_ALLOWED"), where


@pytest.mark.parametrize("service", list(SERVICES))
async def test_every_rpc_as_every_caller(net: Network, service: str) -> None:
    target = net.wallet_target if service == "wallet" else net.coord_target
    async with grpc.aio.insecure_channel(target) as channel:
        for svc in SERVICES[service]:
            for method in svc.methods:
                path = f"/{svc.full_name}/{method.name}"
                for caller in CALLERS:
                    code = await call(channel, method, token_of(net, caller))
                    check(path, caller, code, call.last_reason, EXPECTED[path])  # type: ignore[attr-defined]
        # Health still answers for anyone.
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        resp = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING


async def test_the_sidecar_admin_api_answers_only_its_owner(net: Network) -> None:
    net.start_miner("miner")
    port = net.ports["miner"]
    svc = miner_pb2.DESCRIPTOR.services_by_name["MinerAdminService"]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        for caller in CALLERS:
            for method in svc.methods:
                if method.name == "Drain" and caller == "miner":
                    continue  # the owner's Drain stops the sidecar: test_miner_ops covers it
                code = await call(channel, method, token_of(net, caller))
                reason = call.last_reason  # type: ignore[attr-defined]
                if caller == "miner":
                    assert code == grpc.StatusCode.OK
                elif caller == "none":
                    assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "MISSING_TOKEN")
                else:  # every other token is unknown to a sidecar: it knows only its owner's
                    assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "BAD_TOKEN"), (caller, code)
    net.stop("miner")


def tokens_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aitbc.tokens", *args],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


async def test_tokens_issued_and_revoked_with_the_cli_take_effect_without_a_restart(net: Network) -> None:
    file = str(net.root / "principals.json")
    out = tokens_cli("issue", "--file", file, "--name", "dave", "--role", "admin")
    assert out.returncode == 0, out.stderr
    token = out.stdout.strip()
    assert token.startswith("ait_tok_") and token not in (net.root / "principals.json").read_text()
    req = wallet_pb2.GetBalanceRequest(address=net.ids["client"].address)
    async with grpc.aio.insecure_channel(net.wallet_target) as channel:
        stub: Any = channel.unary_unary(
            "/aitbc.v1.WalletService/GetBalance",
            request_serializer=wallet_pb2.GetBalanceRequest.SerializeToString,
            response_deserializer=wallet_pb2.GetBalanceResponse.FromString,
        )
        md = (("authorization", f"Bearer {token}"),)

        async def accepted() -> None:
            try:
                await stub(req, metadata=md, timeout=5)
            except grpc.aio.AioRpcError as err:
                raise AssertionError(err.code()) from None

        await eventually(accepted, timeout=10)
        listed = tokens_cli("list", "--file", file)
        assert "dave" in listed.stdout and token not in listed.stdout
        assert tokens_cli("revoke", "--file", file, "--name", "dave").returncode == 0

        async def refused() -> None:
            try:
                await stub(req, metadata=md, timeout=5)
            except grpc.aio.AioRpcError as err:
                assert err.code() == grpc.StatusCode.UNAUTHENTICATED
                return
            raise AssertionError("the revoked token still works")

        await eventually(refused, timeout=10)
        bad = tokens_cli("issue", "--file", file, "--name", "m", "--role", "miner")
        assert bad.returncode == 2 and "--miner-id" in bad.stderr


async def test_admin_actions_and_refused_callers_are_audited(net: Network) -> None:
    import json

    async with grpc.aio.insecure_channel(net.wallet_target) as channel:
        mint: Any = channel.unary_unary(
            "/aitbc.v1.WalletService/Mint",
            request_serializer=wallet_pb2.MintRequest.SerializeToString,
            response_deserializer=wallet_pb2.MintResponse.FromString,
        )
        req = wallet_pb2.MintRequest(address=net.ids["client"].address, amount=7, request_id="audited")
        await mint(req, metadata=(("authorization", f"Bearer {net.ids['admin'].token}"),), timeout=5)
        with pytest.raises(grpc.aio.AioRpcError):
            await mint(req, metadata=(("authorization", f"Bearer {net.ids['client'].token}"),), timeout=5)

    async def logged() -> None:
        lines = [json.loads(x) for x in net.log("wallet").read_text().splitlines() if x.startswith("{")]
        audited = [x for x in lines if x.get("audit")]
        assert any(x["event"] == "mint" and x["by"] == "admin" and x["request_id"] == "audited" for x in audited)
        assert any(x["event"] == "rpc_refused" and x["reason"] == "ROLE_NOT_ALLOWED" for x in audited)

    await eventually(logged, timeout=10)


def test_an_rpc_without_declared_roles_is_closed_to_everyone() -> None:
    from aitbc.auth import Principal, TokenTable, hash_token
    from aitbc.errors import PermissionDenied
    from aitbc.server import _Gate

    tokens = TokenTable({hash_token("t"): Principal("root", "admin")})
    gate = _Gate(tokens, {"/aitbc.v1.WalletService/Mint": frozenset({ROLE_NAMES["admin"]})})
    md = (("authorization", "Bearer t"),)
    assert gate.authorize("/aitbc.v1.WalletService/Mint", md) is not None
    for method in ("/aitbc.v1.WalletService/NewRpcNobodyDeclared", "/aitbc.v1.Other/Mint"):
        with pytest.raises(PermissionDenied) as err:
            gate.authorize(method, md)
        assert err.value.reason == "METHOD_NOT_ALLOWED"
    assert gate.authorize("/grpc.health.v1.Health/Check", ()) is None  # health is public
