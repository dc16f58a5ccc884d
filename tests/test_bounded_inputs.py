"""Hostile parties against real processes, trying what costs the coordinator
memory or makes a handler fail: a spec padded with unknown fields, a progress
flood into a watch nobody reads, results for leases not held into a stream
nobody reads, telemetry for GPUs a miner never declared, and numbers, page
tokens and times outside their ranges. Each flood must cost
the coordinator less than RSS_BUDGET of resident memory (its peak, from
/proc); each bad value must be INVALID_ARGUMENT naming its field."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import secrets
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from aitbc import crypto
from aitbc.signed import seal
from aitbc.v1 import coordinator_pb2 as cpb
from aitbc.v1 import coordinator_pb2_grpc, signing_pb2, wallet_pb2, workloads_pb2
from aitbc.workloads.registry import MAX_SPEC_BYTES
from coordinator_svc import _store as st
from coordinator_svc._jobs import WatchHub
from coordinator_svc._store import JobRecord
from tests.cheaters import CheatingMiner
from tests.conftest import ROOT, Network, eventually, md
from tests.test_e2e import Clients, matmul_spec

pytestmark = pytest.mark.timeout(300)

# What one flood may add to the coordinator's resident memory. Before the
# bounds each of these floods added several hundred MiB (see SECURITY.md).
RSS_BUDGET = 200 * 2**20
FUNDS = 10**9


@pytest.fixture
async def clients(network: Network) -> AsyncIterator[Clients]:
    network.start_wallet()
    network.start_coordinator("--max-attempts", "1", "--rate-limits", "client=100000,miner=100000,admin=100000")
    c = Clients(network)
    await c.mint("client", FUNDS)
    try:
        yield c
    finally:
        await c.close()


def memory(net: Network, key: str = "VmHWM", name: str = "coordinator") -> int:
    """VmRSS (now) or VmHWM (peak) of a service process, in bytes."""
    for line in Path(f"/proc/{net.procs[name].pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {key} in /proc status")


def field_of(err: grpc.aio.AioRpcError) -> str:
    """The field a BadRequest names ("" when there is none)."""
    for key, value in err.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            for d in status_pb2.Status.FromString(value).details:
                if d.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                    bad = error_details_pb2.BadRequest()
                    d.Unpack(bad)
                    return str(bad.field_violations[0].field)
    return ""


def unknown_fields(size: int, number: int = 9999) -> bytes:
    """One length-delimited field no message declares, `size` bytes long."""
    return varint(number << 3 | 2) + varint(size) + secrets.token_bytes(size)


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def wallet_check(net: Network) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "wallet_svc", "check", "--db", str(net.root / "wallet.sqlite"),
         "--treasury-address", net.treasury],
        cwd=ROOT, capture_output=True, text=True, timeout=60, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin"},
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr


async def refunded(clients: Clients) -> None:
    async def check() -> None:
        assert await clients.balance(clients.net.ids["client"].address) == (FUNDS, 0)

    await eventually(check)
    wallet_check(clients.net)


class RawMiner:
    """A miner speaking the stream from the test: a hello, then whatever the
    test writes."""

    def __init__(
        self, net: Network, ident: str = "miner3", *, workloads: tuple[str, ...] = ("embed",), gpus: int = 0
    ) -> None:
        self.net = net
        self.ident = net.ids[ident]
        assert self.ident.key is not None
        caps = cpb.Capabilities(
            workloads=list(workloads),
            models=[cpb.ModelInfo(workload="embed", name="all-minilm-l6-v2")],
            slots=1,
            accel=cpb.ACCEL_KIND_CUDA if gpus else cpb.ACCEL_KIND_CPU,
            gpus=[cpb.GpuInfo(index=i, name="fake", memory_total_bytes=2**34) for i in range(gpus)],
        )
        self.hello = cpb.MinerHello(
            miner_id=self.ident.principal.miner_id,
            public_key=self.ident.key.public_key,
            payout_address=self.ident.address,
            capabilities=caps,
        )

    async def __aenter__(self) -> RawMiner:
        self.channel = grpc.aio.insecure_channel(self.net.coord_target)
        self.call: Any = coordinator_pb2_grpc.MinerGatewayServiceStub(self.channel).Connect(metadata=md(self.ident))
        await self.call.write(cpb.ConnectRequest(hello=self.hello))
        assert (await self.call.read()).WhichOneof("msg") == "welcome"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.call.cancel()
        await self.channel.close()

    async def send(self, msg: cpb.ConnectRequest) -> None:
        await self.call.write(msg)

    async def next(self, kind: str) -> Any:
        while True:
            msg = await asyncio.wait_for(self.call.read(), 30)
            assert msg is not grpc.aio.EOF, "the coordinator closed the stream"
            if msg.WhichOneof("msg") == kind:
                return getattr(msg, kind)


def embed_spec(texts: int = 7, size: int = 8000) -> cpb.JobSpec:
    return cpb.JobSpec(
        embed=workloads_pb2.EmbedParams(texts=[secrets.token_hex(size // 2) for _ in range(texts)]),
        max_price=100_000,
    )


async def test_a_spec_padded_with_4_mib_of_unknown_fields_is_stored_without_them(clients: Clients) -> None:
    net = clients.net
    jobs = 40
    before = memory(net, "VmRSS")
    # A miner that is connected but cannot run them: every queued job is
    # looked at on every dispatch pass.
    async with RawMiner(net, workloads=("matmul",)):
        ids = []
        for _ in range(jobs):
            spec = embed_spec(texts=1, size=100).SerializeToString() + unknown_fields(4 * 2**20 - 512)
            raw = cpb.SubmitJobRequest(request_id=secrets.token_hex(8)).SerializeToString()
            raw += b"\x0a" + varint(len(spec)) + spec  # field 1: spec, with the padding inside it
            resp = cpb.SubmitJobResponse.FromString(
                await clients.coord_channel.unary_unary("/aitbc.v1.CoordinatorService/SubmitJob")(
                    raw, metadata=md(net.ids["client"]), timeout=30
                )
            )
            assert resp.job.state == cpb.JOB_STATE_QUEUED
            assert resp.job.spec.ByteSize() < 1024
            ids.append(resp.job.job_id)

        async def considered() -> None:
            for job_id in ids:
                job = (await clients.coord.GetJob(cpb.GetJobRequest(job_id=job_id), metadata=md(net.ids["client"]))).job
                assert "embed" in job.status_detail, job.status_detail

        await eventually(considered)
        grown = memory(net) - before
        print(f"coordinator peak RSS grew by {grown / 2**20:.0f} MiB over {jobs} padded specs")
        assert grown < RSS_BUDGET, f"{grown / 2**20:.0f} MiB"
    with sqlite3.connect(f"file:{net.root / 'coordinator.sqlite'}?mode=ro", uri=True) as db:
        (largest,) = db.execute("SELECT max(length(spec)) FROM jobs").fetchone()
    assert largest < 1024, largest
    for job_id in ids:
        await clients.coord.CancelJob(cpb.CancelJobRequest(job_id=job_id), metadata=md(net.ids["client"]))
    await refunded(clients)


async def test_a_spec_past_its_cap_is_refused_naming_the_spec(clients: Clients) -> None:
    # Each text is within its own limit; together they are not.
    spec = embed_spec(texts=16, size=8000)
    assert spec.ByteSize() > MAX_SPEC_BYTES
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await clients.submit(spec)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field_of(err.value) == "spec"
    job = await clients.submit(embed_spec(texts=7, size=8000))  # just under it
    await clients.coord.CancelJob(cpb.CancelJobRequest(job_id=job.job_id), metadata=md(clients.net.ids["client"]))
    await refunded(clients)


async def test_a_progress_flood_into_a_watch_nobody_reads_costs_little(clients: Clients) -> None:
    net = clients.net
    floods = 20_000
    async with RawMiner(net) as miner:
        job = await clients.submit(embed_spec())  # ~56 KiB of texts: each copy of it counts
        assignment = await miner.next("assignment")
        await miner.send(cpb.ConnectRequest(accepted=cpb.AssignmentAccepted(lease_id=assignment.lease_id)))
        watch = clients.coord.WatchJob(cpb.WatchJobRequest(job_id=job.job_id), metadata=md(net.ids["client"]))
        assert (await watch.read()).job.job_id == job.job_id  # subscribed; never read again until the end

        async def read_all(call: Any) -> list[cpb.Job]:
            seen = []
            while (msg := await call.read()) is not grpc.aio.EOF:
                seen.append(msg.job)
            return seen

        # Another watcher reads as fast as it can: it is shown the progress,
        # but not once per message.
        reader = asyncio.create_task(
            read_all(clients.coord.WatchJob(cpb.WatchJobRequest(job_id=job.job_id), metadata=md(net.ids["client"])))
        )
        before = memory(net, "VmRSS")
        note = "x" * 4000  # longer than a progress message may be
        for i in range(floods):
            progress = cpb.JobProgress(lease_id=assignment.lease_id, fraction=i / floods, message=f"{i} {note}")
            await miner.send(cpb.ConnectRequest(progress=progress))
            if i % 1000 == 0:  # and keep the lease
                await miner.send(cpb.ConnectRequest(heartbeat=cpb.MinerHeartbeat()))

        async def caught_up() -> None:
            shown = await clients.coord.GetJob(cpb.GetJobRequest(job_id=job.job_id), metadata=md(net.ids["client"]))
            assert shown.job.progress_message.startswith(f"{floods - 1} "), shown.job.progress_message[:20]
            assert len(shown.job.progress_message) <= 200

        await eventually(caught_up, timeout=120)
        await asyncio.sleep(1.0)  # what the last messages set off
        grown = memory(net) - before
        print(f"coordinator peak RSS grew by {grown / 2**20:.0f} MiB over {floods} progress messages")
        assert grown < RSS_BUDGET, f"{grown / 2**20:.0f} MiB"
        await clients.coord.CancelJob(cpb.CancelJobRequest(job_id=job.job_id), metadata=md(net.ids["client"]))
        # The slow reader still gets the end, after at most a few snapshots.
        seen = await read_all(watch)
        assert seen[-1].state == cpb.JOB_STATE_CANCELLED, [cpb.JobState.Name(j.state) for j in seen]
        assert len(seen) < floods // 100, len(seen)
        shown = await reader
        assert shown[-1].state == cpb.JOB_STATE_CANCELLED
        progressed = [j for j in shown if j.progress_message]
        print(f"a reading watcher saw {len(progressed)} progress snapshots of {floods} reports")
        assert 0 < len(progressed) < floods // 20, len(progressed)
    await refunded(clients)


async def test_results_for_leases_not_held_into_a_stream_nobody_reads_cost_little(clients: Clients) -> None:
    net = clients.net
    floods = 10_000
    before = memory(net, "VmRSS")
    async with RawMiner(net, workloads=("matmul",), gpus=1) as miner:
        lease = "L" * 40_000  # each answer echoed it, and so did each log line
        for i in range(floods):
            await miner.send(cpb.ConnectRequest(result=cpb.JobResult(lease_id=f"{lease}{i}")))
        # Read in order after them: once its telemetry shows, they were all read.
        mark = cpb.GpuTelemetry(index=0, power_watts=4242.0)
        await miner.send(cpb.ConnectRequest(heartbeat=cpb.MinerHeartbeat(telemetry=[mark])))

        async def all_read() -> None:
            assert 'aitbc_gpu_power_watts{gpu="0",miner_id="miner-3"} 4242.0' in metrics_text(net)

        await eventually(all_read, timeout=120)
        await asyncio.sleep(0.5)  # the answers they set off
        grown = memory(net) - before
        print(f"coordinator peak RSS grew by {grown / 2**20:.0f} MiB over {floods} results for leases it never held")
        assert grown < RSS_BUDGET, f"{grown / 2**20:.0f} MiB"
        # The first answers are there, short; the rest were never queued.
        ack = await miner.next("ack")
        assert ack.verdict == cpb.VERDICT_UNSPECIFIED and len(ack.lease_id) <= 64

    async def counted() -> None:
        assert f'"stale_leases": {floods}' in net.log("coordinator").read_text()

    await eventually(counted)  # in one line, when it left
    log = net.log("coordinator").read_text()
    assert log.count('"stale_lease_refused"') <= 16 and len(log) < 2**20, len(log)


def metrics_text(net: Network) -> str:
    port = int((net.root / "run" / "coordinator.port.metrics").read_text())
    return str(urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode())


def gpu_series(net: Network, miner_id: str) -> int:
    lines = metrics_text(net).splitlines()
    return sum(1 for line in lines if line.startswith("aitbc_gpu_") and f'miner_id="{miner_id}"' in line)


async def test_telemetry_for_100000_undeclared_gpus_is_dropped(clients: Clients) -> None:
    net = clients.net
    miner_id = net.ids["miner3"].principal.miner_id
    before = memory(net, "VmRSS")
    async with RawMiner(net, workloads=("matmul",), gpus=1) as miner:
        for start in range(0, 100_000, 25_000):
            telemetry = [
                cpb.GpuTelemetry(index=i, utilization_percent=50, memory_used_bytes=2**30, power_watts=100.0)
                for i in range(start, start + 25_000)
            ]
            await miner.send(cpb.ConnectRequest(heartbeat=cpb.MinerHeartbeat(telemetry=telemetry)))

        async def one_gpu_shown() -> None:
            # Four gauges for the one GPU it declared, none for the rest.
            assert gpu_series(net, miner_id) == 4

        await eventually(one_gpu_shown, timeout=60)
        grown = memory(net) - before
        print(f"coordinator peak RSS grew by {grown / 2**20:.0f} MiB over 100,000 undeclared GPUs")
        assert grown < RSS_BUDGET, f"{grown / 2**20:.0f} MiB"
        log = net.log("coordinator").read_text()
        assert log.count('"telemetry_undeclared_gpus"') == 1, "dropped telemetry is logged once per stream"

    async def forgotten() -> None:
        assert gpu_series(net, miner_id) == 0

    await eventually(forgotten)


async def test_a_watch_slot_holds_one_snapshot_and_never_loses_the_end() -> None:
    """In process: what the coordinator keeps for a watcher that does not read."""

    def rec(state: str, at: int) -> JobRecord:
        blank: dict[str, Any] = {f.name: "" for f in dataclasses.fields(JobRecord)}
        return JobRecord(**{**blank, "job_id": "job_1", "state": state, "update_time": f"{at:08d}"})

    hub = WatchHub()
    slot = hub.subscribe("job_1")
    for i in range(10_000):
        hub.publish(rec(st.RUNNING, i))
    assert (await slot.take()).update_time == f"{9_999:08d}"
    hub.publish(rec(st.CANCELLED, 10_000))
    hub.publish(rec(st.RUNNING, 10_001))  # a re-read that started before the end landed after it
    assert (await slot.take()).state == st.CANCELLED


async def test_out_of_range_page_tokens_and_times_are_invalid_argument_naming_the_field(clients: Clients) -> None:
    net = clients.net
    client = md(net.ids["client"])

    async def refused(call: Any, field: str) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, err.value.details())
        assert field_of(err.value) == field, (field, err.value.details())

    def token(text: str) -> str:
        return base64.urlsafe_b64encode(text.encode()).decode()

    for value in (str(2**63), str(10**30), str(-(10**30)), "-1", "0"):
        req = wallet_pb2.ListTransactionsRequest(address=net.ids["client"].address, page_token=token(f"before:{value}"))
        await refused(clients.wallet.ListTransactions(req, metadata=client), "page_token")
    for text in ("x|job_1", "2026-01-01T00:00:00+00:00|job_\x00", "\x00|job_1", "9" * 40 + "|job_1"):
        await refused(
            clients.coord.ListJobs(cpb.ListJobsRequest(page_token=token(text)), metadata=client), "page_token"
        )

    year_10000 = 253402300800
    for seconds, nanos in (
        (int(time.time()) + 3600, 1_000_000_000),
        (int(time.time()) + 3600, -1),
        (int(time.time()) + 3600, 2**31 - 1),
        (year_10000, 0),
        (2**63 - 1, 999_999_999),
        (-(2**63), 0),
    ):
        spec = matmul_spec(n=8)
        spec.deadline_time.seconds, spec.deadline_time.nanos = seconds, nanos
        await refused(clients.submit(spec), "spec.deadline_time")
    spec = matmul_spec(n=8)
    spec.deadline_time.seconds = year_10000 - 1  # the last second protobuf can write: far off, but valid
    job = await clients.submit(spec)
    await clients.coord.CancelJob(cpb.CancelJobRequest(job_id=job.job_id), metadata=client)

    # A key rotation signed with a time no clock can show.
    miner = net.ids["miner"]
    assert miner.key is not None
    new = crypto.KeyPair.generate()
    body = signing_pb2.KeyRotationBody(
        network_id="aitbc-devnet", miner_id=miner.principal.miner_id, new_public_key=new.public_key,
        nonce=secrets.token_bytes(16),
    )  # fmt: skip
    body.create_time.seconds, body.create_time.nanos = 2**62, -5
    rotation = seal(body, crypto.KEY_ROTATION_DOMAIN, miner.key)
    gateway = coordinator_pb2_grpc.MinerGatewayServiceStub(clients.coord_channel)
    request = cpb.RotateKeyRequest(
        rotation=rotation, new_key_signature=new.sign(crypto.KEY_ROTATION_DOMAIN, rotation.body)
    )
    await refused(gateway.RotateKey(request, metadata=md(miner)), "rotation.create_time")
    await refunded(clients)


async def test_a_receipt_with_impossible_times_is_refused_and_not_paid(clients: Clients) -> None:
    net = clients.net
    cheater = asyncio.create_task(CheatingMiner(net, "bad_times").run_one())
    await asyncio.sleep(0.3)
    job = await clients.submit(matmul_spec(n=16))
    ack = await asyncio.wait_for(cheater, 60)
    assert ack.verdict == cpb.VERDICT_BAD_SIGNATURE, ack.detail
    final = (await clients.watch(job.job_id))[-1]
    assert final.state == cpb.JOB_STATE_FAILED and not final.HasField("usage")
    await refunded(clients)
    assert await clients.balance(net.ids["cheater"].address) == (0, 0)


async def test_a_nul_in_any_string_and_overlong_hello_lists_are_invalid_argument(
    network: Network, pg_server: Any
) -> None:
    """On PostgreSQL, whose text cannot hold NUL: a NUL anywhere (a request
    id, a model name, a signed transfer's memo, a hello's miner id) was a
    failed write deep in a handler, answered INTERNAL. Each is refused at the
    gate naming its field, and the services go on."""
    network.start_wallet(db=pg_server.new_database())
    network.start_coordinator(coord_db=pg_server.new_database())
    clients = Clients(network)
    client, admin = md(network.ids["client"]), md(network.ids["admin"])

    async def refused(call: Any, field: str) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, err.value.details())
        assert field_of(err.value) == field, (field, err.value.details())

    try:
        await clients.mint("client", FUNDS)
        await refused(clients.submit(matmul_spec(n=8), request_id="a\x00b"), "request_id")
        spec = cpb.JobSpec(llm_gen=workloads_pb2.LlmGenParams(model="tiny\x00gpt2", prompt="hi"), max_price=10**6)
        await refused(clients.submit(spec), "spec.llm_gen.model")
        await refused(clients.coord.GetJob(cpb.GetJobRequest(job_id="job_\x00"), metadata=client), "job_id")
        mint = wallet_pb2.MintRequest(address=network.ids["client"].address, amount=1, request_id="\x00")
        await refused(clients.wallet.Mint(mint, metadata=admin), "request_id")
        alice, bob = network.ids["client"], network.ids["client2"]
        assert alice.key is not None
        body = signing_pb2.TransferBody(
            network_id="aitbc-devnet", from_address=alice.address, to_address=bob.address, amount=5,
            request_id="memo-nul", memo="thanks\x00",
        )  # fmt: skip
        transfer = wallet_pb2.TransferRequest(transfer=seal(body, crypto.TRANSFER_DOMAIN, alice.key))
        await refused(clients.wallet.Transfer(transfer, metadata=client), "transfer.memo")

        def hello(**change: Any) -> cpb.MinerHello:
            h = RawMiner(network).hello
            for name, value in change.items():
                if name == "miner_id":
                    h.miner_id = value
                elif name == "leases":
                    h.in_flight_lease_ids.extend(value)
                elif name == "workloads":
                    h.capabilities.workloads.extend(value)
                elif name == "model":
                    h.capabilities.models.add(workload="llm_gen", name=value)
            return h

        async def hello_refused(h: cpb.MinerHello, field: str) -> None:
            async with grpc.aio.insecure_channel(network.coord_target) as ch:
                call = coordinator_pb2_grpc.MinerGatewayServiceStub(ch).Connect(metadata=md(network.ids["miner3"]))
                await call.write(cpb.ConnectRequest(hello=h))
                await refused(call.read(), field)

        await hello_refused(hello(miner_id="miner-3\x00"), "hello.miner_id")
        await hello_refused(hello(leases=[f"lease_{i}" for i in range(1025)]), "hello.in_flight_lease_ids")
        await hello_refused(hello(leases=["l" * 129]), "hello.in_flight_lease_ids")
        await hello_refused(hello(workloads=[f"w{i}" for i in range(33)]), "hello.capabilities.workloads")
        await hello_refused(hello(model="m" * 129), "hello.capabilities.models")
        # The same hello within its bounds is welcomed, and the ledger whole.
        async with RawMiner(network) as miner:
            assert miner.call is not None
        assert await clients.balance(alice.address) == (FUNDS, 0)
        job = await clients.submit(matmul_spec(n=8))
        assert job.job_id
    finally:
        await clients.close()
