"""A miner whose key file is truly lost gets back in through an operator's
audited re-key (ResetMinerKey, `aitbc admin reset-miner-key`): the new key
connects and earns, the old one is refused everywhere — on open streams,
for receipts, on other replicas — and bad requests get clear statuses.
Also the sidecar version each hello reports, as a bounded metric label."""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import aitbc
from aitbc import crypto
from aitbc.crypto import KeyPair, save_key
from aitbc.rpc import error_reason
from aitbc.signed import seal
from aitbc.timeutil import ts_now
from aitbc.v1 import coordinator_pb2 as cpb
from aitbc.v1 import coordinator_pb2_grpc, signing_pb2
from aitbc.workloads.matmul import encode_output, make_inputs
from aitbc.workloads.registry import workload_of
from coordinator_svc._metrics import version_label
from tests.conftest import ROOT, Network, eventually, md
from tests.test_crypto import SMALL_ORDER_KEYS
from tests.test_e2e import Clients, details, matmul_spec
from tests.test_fuzz import fill, mutate, send
from tests.test_metrics import scrape

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(autouse=True)
def _keys_under_tmp(monkeypatch: pytest.MonkeyPatch) -> None:
    # The test networks live under /tmp; a sidecar refuses its key there
    # unless told it is a throwaway network.
    monkeypatch.setenv("AITBC_MINER_ALLOW_TMP_STATE", "true")


def key_file(net: Network) -> Path:
    return net.root / "miner" / "miner.key"


def start_sidecar(net: Network, *, wait: bool = True, coordinator: str = "coordinator") -> None:
    """miner-1's sidecar, its key file pinned where the test reads it."""
    net.start_miner("miner", wait=wait, coordinator=coordinator, extra=("--key-file", str(key_file(net))))


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aitbc.cli", *args],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip


async def reset(net: Network, target: str, **fields: Any) -> cpb.ResetMinerKeyResponse:
    fields.setdefault("request_id", secrets.token_hex(6))
    fields.setdefault("reason", "test: the owner lost the disk")
    async with grpc.aio.insecure_channel(target) as ch:
        resp: cpb.ResetMinerKeyResponse = await coordinator_pb2_grpc.CoordinatorAdminServiceStub(ch).ResetMinerKey(
            cpb.ResetMinerKeyRequest(**fields), metadata=md(net.ids["admin"]), timeout=10
        )
        return resp


def audited(net: Network, name: str, event: str) -> list[dict[str, Any]]:
    lines = [json.loads(x) for x in net.log(name).read_text().splitlines() if x.startswith("{")]
    return [x for x in lines if x.get("audit") and x.get("event") == event]


class Stream:
    """A miner's Connect stream driven by the test: hello with the key it is
    given, then whatever the test sends; everything received is queued."""

    def __init__(self, net: Network, who: str, key: KeyPair, target: str, version: str = "") -> None:
        ident = net.ids[who]
        self.ident, self.key, self.target = ident, key, target
        self.hello = cpb.MinerHello(
            miner_id=ident.principal.miner_id, public_key=key.public_key, payout_address=ident.address,
            capabilities=cpb.Capabilities(workloads=["matmul"], slots=1, accel=cpb.ACCEL_KIND_CPU), version=version,
        )  # fmt: skip
        self.out: asyncio.Queue[cpb.ConnectRequest] = asyncio.Queue()
        self.got: asyncio.Queue[cpb.ConnectResponse] = asyncio.Queue()
        self.ended: asyncio.Future[tuple[grpc.StatusCode, str]] = asyncio.get_running_loop().create_future()
        self.network_id = ""

    async def __aenter__(self) -> Stream:
        self.channel = grpc.aio.insecure_channel(self.target)
        self.out.put_nowait(cpb.ConnectRequest(hello=self.hello))
        self.call = coordinator_pb2_grpc.MinerGatewayServiceStub(self.channel).Connect(
            self._requests(), metadata=md(self.ident)
        )
        self.task = asyncio.create_task(self._pump())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.call.cancel()
        self.task.cancel()
        await self.channel.close()

    async def _requests(self) -> AsyncIterator[cpb.ConnectRequest]:
        while True:
            yield await self.out.get()

    async def _pump(self) -> None:
        try:
            async for msg in self.call:
                await self.got.put(msg)
            self.ended.set_result((grpc.StatusCode.OK, ""))
        except grpc.aio.AioRpcError as err:
            self.ended.set_result((err.code(), error_reason(err)))

    async def next(self, kind: str, timeout: float = 30) -> Any:
        async def wait() -> Any:
            while True:
                msg = await self.got.get()
                if msg.WhichOneof("msg") == "welcome":
                    self.network_id = msg.welcome.network_id
                if msg.WhichOneof("msg") == kind:
                    return getattr(msg, kind)

        return await asyncio.wait_for(wait(), timeout)

    async def status(self, timeout: float = 30) -> tuple[grpc.StatusCode, str]:
        return await asyncio.wait_for(asyncio.shield(self.ended), timeout)

    def accept(self, a: cpb.Assignment) -> None:
        self.out.put_nowait(cpb.ConnectRequest(accepted=cpb.AssignmentAccepted(lease_id=a.lease_id)))

    def deliver(self, a: cpb.Assignment) -> None:
        """The right output for the assignment, with a receipt signed by this
        stream's key."""
        spec = cpb.JobSpec.FromString(a.job_spec)
        _, params = workload_of(spec)
        a32, b32 = make_inputs(params)
        data = encode_output(params, a32 @ b32)
        body = signing_pb2.ReceiptBody(
            network_id=self.network_id, job_id=a.job_id, lease_id=a.lease_id, miner_id=self.hello.miner_id,
            job_spec_sha256=crypto.sha256(a.job_spec), output_sha256=crypto.sha256(data),
            output_size_bytes=len(data), start_time=ts_now(), finish_time=ts_now(), nonce=secrets.token_bytes(16),
            usage=signing_pb2.Usage(device="cpu"),
        )  # fmt: skip
        receipt = seal(body, crypto.RECEIPT_DOMAIN, self.key)
        self.out.put_nowait(cpb.ConnectRequest(chunk=cpb.ResultChunk(lease_id=a.lease_id, offset=0, data=data)))
        self.out.put_nowait(cpb.ConnectRequest(result=cpb.JobResult(lease_id=a.lease_id, receipt=receipt)))


async def refused_hello(net: Network, who: str, key: KeyPair, target: str) -> tuple[grpc.StatusCode, str]:
    async with Stream(net, who, key, target) as s:
        return await s.status()


async def welcomed(net: Network, who: str, key: KeyPair, target: str) -> bool:
    async with Stream(net, who, key, target) as s:
        await s.next("welcome")
        return True


async def get_job(clients: Clients, job_id: str, stub: Any = None) -> cpb.Job:
    stub = stub or clients.coord
    return (await stub.GetJob(cpb.GetJobRequest(job_id=job_id), metadata=md(clients.net.ids["client"]))).job


async def test_a_lost_key_is_reset_by_the_operator_and_the_sidecar_earns_again(network: Network) -> None:
    network.start_wallet()
    network.start_coordinator("--heartbeat-secs", "0.5")
    start_sidecar(network)
    clients = Clients(network)
    key_path = key_file(network)
    miner_address = network.ids["miner"].address
    try:
        await clients.mint("client", 10**8)
        first = (await clients.watch((await clients.submit(matmul_spec(n=16))).job_id))[-1]
        assert first.state == cpb.JOB_STATE_SETTLED
        old = KeyPair(bytes.fromhex(key_path.read_text().strip()))
        assert first.receipt.public_key == old.public_key
        earned = await clients.balance(miner_address)

        # The disk is gone: the sidecar makes a new key and is locked out.
        network.stop("miner")
        key_path.unlink()
        start_sidecar(network, wait=False)
        # Refused, it stops rather than retry (a supervisor must not loop it).
        assert await asyncio.to_thread(network.procs["miner"].wait, 90) != 0
        network.stop("miner")
        assert "KEY_MISMATCH" in network.log("miner").read_text()

        # The owner reads the new public key off the key file and sends it.
        shown = cli("--key-file", str(key_path), "keys", "show")
        assert shown.returncode == 0, shown.stderr
        new_hex = re.search(r"^public\s+([0-9a-f]{64})$", shown.stdout, re.M).group(1)  # type: ignore[union-attr]
        assert new_hex != old.public_key.hex()

        # The operator re-keys the miner id, with a reason for the audit log.
        admin = {"AITBC_ADMIN_TOKEN": network.ids["admin"].token}

        def reset_cli(public_key: str) -> subprocess.CompletedProcess[str]:
            return cli("--coordinator", network.coord_target, "admin", "reset-miner-key", "--miner-id", "miner-1",
                       "--public-key", public_key, "--reason", "ticket 42: disk died", "--request-id", "rk-42",
                       env=admin)  # fmt: skip

        out = reset_cli(new_hex)
        assert out.returncode == 0, out.stdout + out.stderr
        assert f"old key   {old.public_key.hex()}" in out.stdout and f"new key   {new_hex}" in out.stdout

        start_sidecar(network)
        second = (await clients.watch((await clients.submit(matmul_spec(n=16))).job_id))[-1]
        assert second.state == cpb.JOB_STATE_SETTLED and second.miner_id == "miner-1"
        assert second.receipt.public_key.hex() == new_hex
        assert await clients.balance(miner_address) == (earned[0] + second.miner_amount, 0)
        assert second.miner_amount > 0

        # The old key is refused, as a stream's key.
        assert await refused_hello(network, "miner", old, network.coord_target) == (
            grpc.StatusCode.PERMISSION_DENIED,
            "KEY_MISMATCH",
        )
        # A retry of the same request changes nothing; the same id for
        # another key is refused.
        again = reset_cli(new_hex)
        assert again.returncode == 0, again.stdout + again.stderr
        other = reset_cli(KeyPair.generate().public_key.hex())
        assert other.returncode == 3 and "ALREADY_EXISTS REQUEST_ID_REUSED" in other.stderr

        lines = audited(network, "coordinator", "miner_key_reset")
        assert len(lines) == 1, lines
        assert lines[0]["by"] == "admin" and lines[0]["miner_id"] == "miner-1"
        assert lines[0]["old_key"] == old.public_key.hex() and lines[0]["new_key"] == new_hex
        assert lines[0]["reason"] == "ticket 42: disk died" and lines[0]["request_id"] == "rk-42"
        assert await welcomed(network, "miner2", network.ids["miner2"].key, network.coord_target)  # type: ignore[arg-type]
    finally:
        await clients.close()


async def test_a_reset_closes_the_old_keys_stream_and_its_job_goes_to_the_new_key(network: Network) -> None:
    network.start_wallet()
    network.start_coordinator("--heartbeat-secs", "0.5")
    clients = Clients(network)
    old = network.ids["miner"].key
    assert old is not None
    try:
        await clients.mint("client", 10**8)
        async with Stream(network, "miner", old, network.coord_target) as stale:
            await stale.next("welcome")
            job = await clients.submit(matmul_spec(n=16))
            stale.accept(await stale.next("assignment"))
            new = KeyPair.generate()
            resp = await reset(network, network.coord_target, miner_id="miner-1", new_public_key=new.public_key)
            assert (resp.old_public_key, resp.public_key) == (old.public_key, new.public_key)
            assert await stale.status() == (grpc.StatusCode.PERMISSION_DENIED, "KEY_MISMATCH")

        async def requeued() -> None:
            # Only the state: the dispatcher rewrites status_detail ("no miner is
            # connected") as soon as it looks for another miner.
            j = await get_job(clients, job.job_id)
            assert j.state == cpb.JOB_STATE_QUEUED and j.attempts == 1, j

        await eventually(requeued, timeout=15)
        save_key(key_file(network), new)
        start_sidecar(network)
        final = (await clients.watch(job.job_id))[-1]
        assert final.state == cpb.JOB_STATE_SETTLED and final.attempts == 2
        assert final.receipt.public_key == new.public_key
        assert await clients.balance(network.ids["miner"].address) == (final.miner_amount, 0)
        closed = audited(network, "coordinator", "miner_stream_closed_stale_key")
        assert [x["key"] for x in closed] == [old.public_key.hex()]
    finally:
        await clients.close()


def replace_key_in_db(db: str, miner_id: str, key: bytes) -> None:
    """What another replica's reset writes, without the announcement."""
    if db.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(db, autocommit=True) as conn:
            conn.execute("UPDATE miners SET public_key = %s WHERE miner_id = %s", (key, miner_id))
        return
    lite = sqlite3.connect(db, timeout=10)
    with lite:
        lite.execute("UPDATE miners SET public_key = ? WHERE miner_id = ?", (key, miner_id))
    lite.close()


def refused_count(db: str, miner_id: str) -> int:
    if db.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(db) as conn:
            row = conn.execute("SELECT refused FROM miners WHERE miner_id = %s", (miner_id,)).fetchone()
    else:
        lite = sqlite3.connect(db)
        row = lite.execute("SELECT refused FROM miners WHERE miner_id = ?", (miner_id,)).fetchone()
        lite.close()
    assert row is not None
    return int(row[0])


@pytest.mark.parametrize("store", ["sqlite", "postgres"])
async def test_a_receipt_under_a_replaced_key_is_refused_even_unannounced(
    network: Network, store: str, request: pytest.FixtureRequest
) -> None:
    """The store says which key signs for a miner, not the stream's memory:
    a reset this replica never heard of still stops the old key's receipt."""
    db = (
        str(network.root / "coord.sqlite") if store == "sqlite" else request.getfixturevalue("pg_server").new_database()
    )
    network.start_wallet()
    network.start_coordinator("--heartbeat-secs", "0.5", coord_db=db)
    clients = Clients(network)
    old = network.ids["miner"].key
    assert old is not None
    try:
        await clients.mint("client", 10**8)
        async with Stream(network, "miner", old, network.coord_target) as stale:
            await stale.next("welcome")
            job = await clients.submit(matmul_spec(n=16))
            a = await stale.next("assignment")
            stale.accept(a)
            replace_key_in_db(db, "miner-1", KeyPair.generate().public_key)
            stale.deliver(a)
            ack = await stale.next("ack")
            assert ack.verdict == cpb.VERDICT_BAD_SIGNATURE and "key was replaced" in ack.detail
            assert await stale.status() == (grpc.StatusCode.PERMISSION_DENIED, "KEY_MISMATCH")

        async def requeued() -> None:
            j = await get_job(clients, job.job_id)
            assert j.state == cpb.JOB_STATE_QUEUED and j.attempts == 1, j

        await eventually(requeued, timeout=15)
        assert await clients.balance(network.ids["miner"].address) == (0, 0)
        # Not a cheat of the miner id's new owner: its standing is untouched.
        assert refused_count(db, "miner-1") == 0
    finally:
        await clients.close()


async def test_a_reset_on_one_replica_closes_the_stream_on_another(network: Network, pg_server: Any) -> None:
    dsn = pg_server.new_database()
    network.start_wallet()
    network.start_coordinator("--heartbeat-secs", "0.5", coord_db=dsn)
    network.start_coordinator("--heartbeat-secs", "0.5", coord_db=dsn, name="coordinator2")
    one, two = network.coord_target, network.target("coordinator2")
    clients = Clients(network)
    stub_two = coordinator_pb2_grpc.CoordinatorServiceStub(channel_two := grpc.aio.insecure_channel(two))
    old = network.ids["miner"].key
    assert old is not None
    try:
        await clients.mint("client", 10**8)
        async with Stream(network, "miner", old, two) as stale:
            await stale.next("welcome")
            job = (
                await stub_two.SubmitJob(
                    cpb.SubmitJobRequest(spec=matmul_spec(n=16), request_id="on-two"),
                    metadata=md(network.ids["client"]),
                )
            ).job
            stale.accept(await stale.next("assignment"))
            new = KeyPair.generate()
            await reset(network, one, miner_id="miner-1", new_public_key=new.public_key)
            assert await stale.status(timeout=15) == (grpc.StatusCode.PERMISSION_DENIED, "KEY_MISMATCH")
        for target in (one, two):
            assert await refused_hello(network, "miner", old, target) == (
                grpc.StatusCode.PERMISSION_DENIED,
                "KEY_MISMATCH",
            )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await reset(network, two, miner_id="nobody", new_public_key=new.public_key)
        assert (err.value.code(), error_reason(err.value)) == (grpc.StatusCode.NOT_FOUND, "MINER_NOT_FOUND")

        # The owner's sidecar with the new key runs the requeued job there.
        save_key(key_file(network), new)
        start_sidecar(network, coordinator="coordinator2")
        final = [e.job async for e in stub_two.WatchJob(cpb.WatchJobRequest(job_id=job.job_id),
                                                        metadata=md(network.ids["client"]))][-1]  # fmt: skip
        assert final.state == cpb.JOB_STATE_SETTLED and final.receipt.public_key == new.public_key
        assert await clients.balance(network.ids["miner"].address) == (final.miner_amount, 0)
        assert len(audited(network, "coordinator", "miner_key_reset")) == 1
        assert audited(network, "coordinator2", "miner_stream_closed_stale_key")
    finally:
        await channel_two.close()
        await clients.close()


async def test_bad_resets_get_clear_statuses_and_change_nothing(network: Network) -> None:
    network.start_wallet()
    network.start_coordinator()
    key = network.ids["miner"].key
    assert key is not None
    assert await welcomed(network, "miner", key, network.coord_target)  # registers miner-1
    good = {"miner_id": "miner-1", "new_public_key": KeyPair.generate().public_key}
    cases: list[tuple[dict[str, Any], grpc.StatusCode, str, str]] = [
        ({"new_public_key": b"\x01" * 31}, grpc.StatusCode.INVALID_ARGUMENT, "BAD_PUBLIC_KEY", "new_public_key"),
        ({"new_public_key": b"\x01" * 33}, grpc.StatusCode.INVALID_ARGUMENT, "BAD_PUBLIC_KEY", "new_public_key"),
        ({"new_public_key": b""}, grpc.StatusCode.INVALID_ARGUMENT, "BAD_PUBLIC_KEY", "new_public_key"),
        ({"new_public_key": SMALL_ORDER_KEYS[0]}, grpc.StatusCode.INVALID_ARGUMENT, "BAD_PUBLIC_KEY",
         "new_public_key"),
        ({"reason": ""}, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", "reason"),
        ({"reason": " \n\t "}, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", "reason"),
        ({"reason": "x" * 501}, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", "reason"),
        ({"miner_id": ""}, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", "miner_id"),
        ({"miner_id": "m" * 129}, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", "miner_id"),
        ({"request_id": ""}, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", "request_id"),
        ({"request_id": "r" * 129}, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", "request_id"),
        ({"miner_id": "miner-9"}, grpc.StatusCode.NOT_FOUND, "MINER_NOT_FOUND", "miner_id"),
    ]  # fmt: skip
    for change, code, reason, field in cases:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await reset(network, network.coord_target, **{**good, **change})
        got = details(err.value)
        infos = [d for d in got if d.DESCRIPTOR.name == "ErrorInfo"]
        assert (err.value.code(), error_reason(err.value)) == (code, reason), (change, err.value.details())
        assert infos and infos[0].domain == "aitbc.dev" and infos[0].metadata["field"] == field, (change, got)
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            violations = [v.field for d in got if d.DESCRIPTOR.name == "BadRequest" for v in d.field_violations]
            assert violations == [field], (change, got)
    # The same request id for another key: refused, and the first one stands.
    await reset(network, network.coord_target, **good, request_id="once")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await reset(network, network.coord_target, **{**good, "new_public_key": key.public_key}, request_id="once")
    assert (err.value.code(), error_reason(err.value)) == (grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_REUSED")
    assert await refused_hello(network, "miner", key, network.coord_target) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "KEY_MISMATCH",
    )
    assert len(audited(network, "coordinator", "miner_key_reset")) == 1


def test_random_and_mutated_reset_requests_never_yield_internal(network: Network) -> None:
    network.start_wallet()
    network.start_coordinator("--rate-limits", "admin=100000")
    method = cpb.DESCRIPTOR.services_by_name["CoordinatorAdminService"].methods_by_name["ResetMinerKey"]
    valid_keys = [KeyPair.generate().public_key for _ in range(3)]
    seen: set[str] = set()

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(data=st.data())
    def case(data: st.DataObject) -> None:
        kind = data.draw(st.sampled_from(["fields", "mutated", "random"]))
        if kind == "random":
            payload = data.draw(st.binary(max_size=200))
        else:
            msg = fill(message_factory.GetMessageClass(method.input_type)(), data)
            # Valid values now and then, so that requests reach the store.
            if data.draw(st.booleans()):
                msg.new_public_key = data.draw(st.sampled_from(valid_keys))
                msg.reason = msg.reason or "fuzz"
                msg.request_id = msg.request_id or "fuzz"
            payload = msg.SerializeToString()
            if kind == "mutated":
                payload = mutate(payload, data)
        code = asyncio.run(send(network, "coordinator", method, payload))
        seen.add(code.name)
        assert code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), (kind, payload[:200])

    case()
    assert {"INVALID_ARGUMENT", "NOT_FOUND"} <= seen, seen  # past parsing and checks, to the store
    assert all(p.poll() is None for p in network.procs.values())


def test_the_cli_checks_its_input_before_calling() -> None:
    base = ["--coordinator", "127.0.0.1:1", "admin", "reset-miner-key", "--miner-id", "m"]
    no_token = cli(*base, "--public-key", "00" * 32, "--reason", "r", env={"AITBC_ADMIN_TOKEN": "", "ADMIN_TOKEN": ""})
    assert no_token.returncode == 2 and "admin token" in no_token.stderr
    bad_hex = cli(*base, "--public-key", "zz", "--reason", "r", "--admin-token", "t")
    assert bad_hex.returncode == 2 and "--public-key" in bad_hex.stderr
    blank = cli(*base, "--public-key", "00" * 32, "--reason", "  ", "--admin-token", "t")
    assert blank.returncode == 2 and "--reason" in blank.stderr
    version = cli("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"aitbc {aitbc.__version__}"


def test_version_labels_are_bounded() -> None:
    for good in ("0.1.0", "1.2.3rc1", "0.1.0+g1a2b3c4", "v2.0.1", "10.20.30.40", "0.0.0+unknown"):
        assert version_label(good) == good
    assert version_label("") == "unknown"
    for bad in ("A" * 10240, "1" * 60, "0.1.0" + "x" * 30, "latest", "0.1.0\n", '0.1.0"}', "1", "０.1.0"):
        assert version_label(bad) == "other", bad


async def test_sidecar_versions_show_in_the_metric_with_bounded_labels(network: Network) -> None:
    network.start_wallet()
    network.start_coordinator()
    keys = {who: network.ids[who].key for who in ("miner", "miner2", "miner3")}
    garbage = "A" * 10240

    def versions() -> dict[str, float]:
        return {
            dict(labels)["version"]: v
            for (name, labels), v in scrape(network, "coordinator").items()
            if name == "aitbc_miner_sidecar_versions"
        }

    async with (
        Stream(network, "miner", keys["miner"], network.coord_target, version="0.1.0") as a,  # type: ignore[arg-type]
        Stream(network, "miner2", keys["miner2"], network.coord_target, version=garbage) as b,  # type: ignore[arg-type]
        Stream(network, "miner3", keys["miner3"], network.coord_target) as c,  # type: ignore[arg-type]
    ):
        for s in (a, b, c):
            await s.next("welcome")
        assert versions() == {"0.1.0": 1, "other": 1, "unknown": 1}
        b.call.cancel()

        async def gone() -> None:
            assert versions() == {"0.1.0": 1, "unknown": 1}

        await eventually(gone, timeout=10)
    text = network.log("coordinator").read_text()
    assert garbage[:100] not in text  # nor in the log, beyond a short prefix
    joined = [json.loads(x) for x in text.splitlines() if x.startswith("{") and '"miner_joined"' in x]
    assert {x["miner_id"]: x["version"] for x in joined} == {
        "miner-1": "0.1.0",
        "miner-2": "other",
        "miner-3": "unknown",
    }
