"""The network keeps moving: a coordinator restarted while the wallet is
down, a miner's stream cut and restored, the coordinator's wall clock
stepped an hour either way, and result blobs kept only as long as their
retention. Real processes; every test checks the books before and after and
ends with a clean `wallet_svc check`."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable
from functools import partial
from pathlib import Path

import grpc
import pytest

from aitbc.crypto import save_key
from aitbc.v1 import coordinator_pb2 as cpb
from aitbc.v1 import coordinator_pb2_grpc, workloads_pb2
from coordinator_svc._leases import GONE, LOCAL, REMOTE, LeaseClock, LeaseRow
from tests.conftest import ROOT, Network, eventually, md
from tests.test_db_faults import status_details
from tests.test_e2e import Clients, matmul_spec
from tests.test_hostile_identity import revoke
from tests.test_metrics import scrape, value

pytestmark = pytest.mark.timeout(300)

TERMINAL = {cpb.JOB_STATE_SETTLED, cpb.JOB_STATE_FAILED, cpb.JOB_STATE_CANCELLED, cpb.JOB_STATE_EXPIRED}


def slow_spec(seed: int, repeats: int = 40, max_price: int = 10_000_000) -> cpb.JobSpec:
    """A few seconds of CPU, so that a stream can be cut while it runs."""
    return cpb.JobSpec(
        matmul=workloads_pb2.MatmulParams(n=1024, dtype=workloads_pb2.DTYPE_FP32, seed=seed, repeats=repeats),
        max_price=max_price,
    )


async def get(clients: Clients, job_id: str) -> cpb.Job:
    resp = await clients.coord.GetJob(cpb.GetJobRequest(job_id=job_id), metadata=md(clients.net.ids["client"]))
    return resp.job


async def ended(clients: Clients, job_id: str, timeout: float = 120) -> cpb.Job:
    async def check() -> cpb.Job:
        job = await get(clients, job_id)
        assert job.state in TERMINAL, job
        return job

    return await eventually(check, timeout=timeout, interval=0.2)


async def state_is(clients: Clients, job_id: str, state: int, timeout: float = 60) -> cpb.Job:
    async def check() -> cpb.Job:
        job = await get(clients, job_id)
        assert job.state == state, (cpb.JobState.Name(job.state), job.status_detail)
        return job

    return await eventually(check, timeout=timeout, interval=0.1)


async def books_balance(clients: Clients, minted: int, jobs: list[cpb.Job], miners: dict[str, str]) -> None:
    """Every settled job paid once: the client down by the prices, each
    miner up by its share, the treasury by the fees, nothing held."""
    net = clients.net
    settled = [j for j in jobs if j.state == cpb.JOB_STATE_SETTLED]

    async def check() -> None:
        assert await clients.balance(net.ids["client"].address) == (minted - sum(j.price for j in settled), 0)
        assert await clients.balance(net.treasury) == (sum(j.fee_amount for j in settled), 0)
        for name, miner_id in miners.items():
            earned = sum(j.miner_amount for j in settled if j.miner_id == miner_id)
            assert await clients.balance(net.ids[name].address) == (earned, 0), name

    await eventually(check, timeout=60)


def wallet_check(network: Network) -> None:
    check = subprocess.run(
        [sys.executable, "-m", "wallet_svc", "check", "--db", str(network.root / "wallet.sqlite"),
         "--treasury-address", network.treasury],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr


@contextlib.asynccontextmanager
async def connected(network: Network) -> AsyncIterator[Clients]:
    c = Clients(network)
    try:
        yield c
    finally:
        await c.close()


# -- the lease clock, alone ----------------------------------------------------


class Clocks:
    def __init__(self) -> None:
        self.mono = 1000.0
        self.wall = 1.8e9

    def step(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += seconds


def lease_clock(lease: float = 10.0, grace: float = 30.0) -> tuple[LeaseClock, Clocks]:
    c = Clocks()
    return LeaseClock(lease, grace, clock=lambda: c.mono, wall=lambda: c.wall), c


def test_a_wall_clock_step_moves_no_lease_deadline() -> None:
    leases, c = lease_clock()
    leases.assigned("l1", "j1", "m1", run_due=c.mono + 100, stored=c.wall + 10)
    c.wall -= 3600  # an hour back: nothing would lapse for an hour on the wall clock
    c.step(9)
    assert leases.lapsed() == []
    c.step(2)
    assert [x.lease_id for x in leases.lapsed()] == ["l1"]
    leases, c = lease_clock()
    leases.assigned("l1", "j1", "m1", run_due=c.mono + 100, stored=c.wall + 10)
    c.wall += 3600  # an hour forward: everything would lapse at once
    c.step(5)
    assert leases.lapsed() == [] and leases.overrun() == []
    leases.renewed(["l1"], stored=c.wall + 10)
    c.step(9)
    assert leases.lapsed() == []
    c.step(91)
    assert [x.lease_id for x in leases.overrun()] == ["l1"]


def test_a_gone_miner_keeps_its_lease_for_the_grace_and_no_longer() -> None:
    leases, c = lease_clock(lease=10, grace=30)
    leases.assigned("l1", "j1", "m1", run_due=c.mono + 1000, stored=c.wall + 10)
    leases.gone(["l1"])
    c.step(29)
    assert leases.lapsed() == []
    c.step(2)
    assert [(x.lease_id, x.holder) for x in leases.lapsed()] == [("l1", GONE)]
    # Back within the grace: held again, renewed, its run-time bound kept.
    leases, c = lease_clock(lease=10, grace=30)
    leases.assigned("l1", "j1", "m1", run_due=c.mono + 50, stored=c.wall + 10)
    leases.gone(["l1"])
    c.step(20)
    c.wall += 3600
    assert leases.held("l1", "j1", "m1", run_deadline=c.wall + 9999, stored=0) == 1050
    assert leases.get("l1").holder == LOCAL  # type: ignore[union-attr]
    # The grace never outlasts the run-time bound.
    leases, c = lease_clock(lease=10, grace=30)
    leases.assigned("l1", "j1", "m1", run_due=c.mono + 15, stored=c.wall + 10)
    leases.gone(["l1"])
    c.step(16)
    assert [x.lease_id for x in leases.overrun()] == ["l1"]


def test_leases_read_from_the_store_lapse_only_when_nobody_renews_them() -> None:
    leases, c = lease_clock(lease=10, grace=30)
    started = c.mono
    leases.observe([LeaseRow("j1", "l1", "m1", c.wall + 10, c.wall + 100)], started)
    assert leases.get("l1").holder == REMOTE  # type: ignore[union-attr]
    for _ in range(10):  # another replica's heartbeats move the stored deadline
        c.step(5)
        stored = c.wall + 10
        leases.observe([LeaseRow("j1", "l1", "m1", stored, c.wall + 100)], c.mono)
        assert leases.lapsed() == []
    c.step(39)  # and stop: a lease and a grace later it lapses here
    leases.observe([LeaseRow("j1", "l1", "m1", stored, c.wall + 100)], c.mono)
    assert leases.lapsed() == []
    c.step(2)
    assert [x.lease_id for x in leases.lapsed()] == ["l1"]
    # Ended: forgotten; one ended after the scan read it is not brought back.
    scan = c.mono
    leases.ended("l1")
    leases.observe([LeaseRow("j1", "l1", "m1", 0, 0)], scan)
    assert leases.get("l1") is None
    # One assigned while a scan was in flight is not dropped by it.
    scan = c.mono
    c.step(0.1)
    leases.assigned("l2", "j2", "m1", run_due=c.mono + 100, stored=c.wall + 10)
    leases.observe([], scan)
    assert leases.get("l2") is not None
    leases.observe([], c.mono + 1)
    assert leases.get("l2") is None


# -- the wallet away -----------------------------------------------------------


async def test_a_coordinator_restarted_while_the_wallet_is_down_serves_and_catches_up(network: Network) -> None:
    """The operator's bad day: the wallet is down, a submit is half done
    (its job stored, its hold never confirmed), a verdict is waiting to be
    paid, and the coordinator restarts. It starts, serves GetJob, ListJobs
    and WatchJob, takes miners and runs queued work; submits answer
    UNAVAILABLE with RetryInfo. When the wallet returns, the half-done job
    is held and run and the waiting settlement lands, without any client
    retrying; the client's retry then finds the same job."""
    flags = ("--lease-secs", "5", "--heartbeat-secs", "0.5")
    network.start_wallet()
    wallet_port = network.ports["wallet"]
    network.start_coordinator(*flags)
    coord_port = network.ports["coordinator"]
    async with connected(network) as clients:
        await wallet_away_during_a_restart(network, clients, wallet_port, coord_port, flags)
    network.stop_all()
    wallet_check(network)


async def wallet_away_during_a_restart(
    network: Network, clients: Clients, wallet_port: int, coord_port: int, flags: tuple[str, ...]
) -> None:
    minted = 100_000_000
    await clients.mint("client", minted)
    assert await clients.balance(network.ids["client"].address) == (minted, 0)
    network.start_miner("miner")
    first = await clients.submit(matmul_spec(n=32))
    first = await ended(clients, first.job_id)
    assert first.state == cpb.JOB_STATE_SETTLED
    # Queued and held with no miner to run it: it will be judged while the
    # wallet is away.
    assert network.stop("miner") == 0
    waiting = await clients.submit(matmul_spec(n=48))
    network.stop("wallet", signal.SIGKILL)

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await clients.submit(matmul_spec(n=40), request_id="half-done")
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
    reason, retry = status_details(err.value)
    assert reason == "WALLET_UNAVAILABLE" and retry is not None and retry > 0

    network.stop("coordinator", signal.SIGKILL)
    network.start_coordinator(*flags, port=coord_port)  # ready: it did not wait for the wallet
    client = md(network.ids["client"])
    listed = await clients.coord.ListJobs(cpb.ListJobsRequest(page_size=10), metadata=client, timeout=10)
    assert len(listed.jobs) == 3
    half = next(j for j in listed.jobs if j.job_id not in (first.job_id, waiting.job_id))
    assert half.state == cpb.JOB_STATE_QUEUED and half.attempts == 0
    assert (await get(clients, first.job_id)).state == cpb.JOB_STATE_SETTLED
    watch = clients.coord.WatchJob(cpb.WatchJobRequest(job_id=waiting.job_id), metadata=client, timeout=120)
    snapshots = aiter(watch)
    assert (await anext(snapshots)).job.state == cpb.JOB_STATE_QUEUED

    network.start_miner("miner")  # ready once the coordinator welcomed it
    settling = await state_is(clients, waiting.job_id, cpb.JOB_STATE_SETTLING)
    assert settling.verdict == cpb.VERDICT_ACCEPTED and settling.attempts == 1
    assert (await get(clients, half.job_id)).state == cpb.JOB_STATE_QUEUED  # never dispatched unheld
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await clients.submit(matmul_spec(n=40), request_id="half-done")
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE

    network.start_wallet(port=wallet_port)
    paid = await ended(clients, waiting.job_id)
    late = await ended(clients, half.job_id)
    assert paid.state == late.state == cpb.JOB_STATE_SETTLED, (paid.status_detail, late.status_detail)
    assert late.attempts == 1
    seen = [s.job.state async for s in snapshots]
    assert seen[-1] == cpb.JOB_STATE_SETTLED and cpb.JOB_STATE_SETTLING in seen, seen
    retried = await clients.submit(matmul_spec(n=40), request_id="half-done")
    assert retried.job_id == half.job_id and retried.state == cpb.JOB_STATE_SETTLED
    jobs = [await get(clients, j) for j in (first.job_id, waiting.job_id, half.job_id)]
    await books_balance(clients, minted, jobs, {"miner": "miner-1"})
    log = network.log("coordinator").read_text()
    assert '"event": "hold_confirmed_late"' in log


async def test_the_cli_retries_a_submit_until_the_wallet_is_back(network: Network) -> None:
    """`aitbc submit` while the wallet is down: the coordinator says
    UNAVAILABLE with RetryInfo, the command asks again with the same
    request id, and once the wallet is back the one job runs and settles."""
    network.start_wallet()
    wallet_port = network.ports["wallet"]
    network.start_coordinator("--lease-secs", "5", "--heartbeat-secs", "0.5")
    network.start_miner("miner")
    minted = 100_000_000
    async with connected(network) as clients:
        await clients.mint("client", minted)
        network.stop("wallet", signal.SIGKILL)
        client = network.ids["client"]
        assert client.key is not None
        save_key(network.root / "client.key", client.key)
        env = {
            **os.environ, "AITBC_COORDINATOR": network.coord_target, "AITBC_WALLET": network.wallet_target,
            "AITBC_TOKEN": client.token, "AITBC_KEY_FILE": str(network.root / "client.key"),
        }  # fmt: skip
        cli = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).parent / "aitbc"), "submit", "matmul", "--n", "64", "--request-id", "cli-1",
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert cli.stderr is not None
        first = await asyncio.wait_for(cli.stderr.readline(), 60)
        assert b"UNAVAILABLE WALLET_UNAVAILABLE" in first and b"retrying request cli-1" in first, first
        network.start_wallet(port=wallet_port)
        out, err = await asyncio.wait_for(cli.communicate(), 120)
        assert cli.returncode == 0, (out, first + err)
        assert b"SETTLED" in out, out
        listed = await clients.coord.ListJobs(cpb.ListJobsRequest(), metadata=md(client), timeout=10)
        assert len(listed.jobs) == 1 and listed.jobs[0].state == cpb.JOB_STATE_SETTLED
        await books_balance(clients, minted, list(listed.jobs), {"miner": "miner-1"})
    network.stop_all()
    wallet_check(network)


# -- a miner's stream cut ------------------------------------------------------


class Proxy:
    """A TCP hop between a sidecar and the coordinator that the test can cut
    (every connection reset, new ones refused, as a flapping link or a
    NAT that dropped its state) and restore."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.accepted = 0
        self._server: asyncio.Server | None = None
        self._links: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._link, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _link(self, down_r: asyncio.StreamReader, down_w: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            down_w.transport.abort()
            return
        self.accepted += 1
        link = (down_w, up_w)
        self._links.add(link)

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            w.transport.abort()

        try:
            await asyncio.gather(pipe(down_r, up_w), pipe(up_r, down_w))
        finally:
            self._links.discard(link)

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for down_w, up_w in list(self._links):
            down_w.transport.abort()  # RST both ways
            up_w.transport.abort()
        self._links.clear()
        await self._server.wait_closed()

    async def restore(self) -> None:
        await self.start()


async def through_proxy(network: Network, name: str) -> Proxy:
    proxy = Proxy(network.ports["coordinator"])
    await proxy.start()
    network.ports[f"proxy-{name}"] = proxy.port
    # Not waited for here: the wait blocks, and this loop runs the proxy.
    network.start_miner(name, coordinator=f"proxy-{name}", wait=False)
    ready = network.root / "run" / f"{name}.ready"

    async def welcomed() -> None:
        assert ready.exists() or network.procs[name].poll() is not None
        assert network.procs[name].poll() is None, network.log(name).read_text()[-2000:]

    await eventually(welcomed, timeout=60)
    return proxy


def log_count(network: Network, name: str, event: str) -> int:
    return network.log(name).read_text().count(f'"event": "{event}"')


async def test_a_miner_cut_off_within_the_grace_keeps_its_job_and_is_paid_once(network: Network) -> None:
    """Four resets of the miner's link while its job runs, and the result
    finished while the link is down: every time it reconnects within the
    grace, keeps its lease, and its result is accepted. Nothing runs twice
    (attempts 1) and nothing is refused."""
    network.start_wallet()
    network.start_coordinator("--lease-secs", "3", "--heartbeat-secs", "0.5", "--reconnect-grace-secs", "30")
    minted = 100_000_000
    async with connected(network) as clients:
        await clients.mint("client", minted)
        proxy = await through_proxy(network, "miner")
        job = await clients.submit(slow_spec(seed=11, repeats=60))
        await state_is(clients, job.job_id, cpb.JOB_STATE_RUNNING)
        for i in range(3):  # flapping: cut, back a moment later, cut again once it is back

            async def rejoined(times: int = i + 2) -> None:
                assert log_count(network, "coordinator", "miner_joined") == times

            await proxy.cut()
            await asyncio.sleep(1.0)
            await proxy.restore()
            await eventually(rejoined, timeout=30)
        await proxy.cut()

        async def finished_offline() -> None:
            assert log_count(network, "miner", "job_finished") == 1

        await eventually(finished_offline, timeout=120)
        assert (await get(clients, job.job_id)).state == cpb.JOB_STATE_RUNNING  # still its lease
        await proxy.restore()
        final = await ended(clients, job.job_id)
        assert final.state == cpb.JOB_STATE_SETTLED, final.status_detail
        assert (final.miner_id, final.attempts) == ("miner-1", 1)
        assert proxy.accepted >= 5, proxy.accepted  # it did reconnect each time
        assert log_count(network, "coordinator", "leases_kept_for_reconnect") >= 4
        assert log_count(network, "coordinator", "stale_lease_refused") == 0
        assert "lease no longer valid" not in network.log("miner").read_text()
        await books_balance(clients, minted, [final], {"miner": "miner-1"})
    network.stop_all()
    wallet_check(network)


async def test_a_miner_gone_past_the_grace_loses_its_job_to_another(network: Network) -> None:
    """Cut off for longer than the grace: the job is requeued and run by
    another miner. The first miner, back with its finished result, is told
    its lease is gone; the job is paid once, to the second."""
    network.start_wallet()
    network.start_coordinator("--lease-secs", "3", "--heartbeat-secs", "0.5", "--reconnect-grace-secs", "3")
    minted = 100_000_000
    async with connected(network) as clients:
        await clients.mint("client", minted)
        proxy = await through_proxy(network, "miner")
        job = await clients.submit(slow_spec(seed=12, repeats=60))
        await state_is(clients, job.job_id, cpb.JOB_STATE_RUNNING)
        await proxy.cut()

        await state_is(clients, job.job_id, cpb.JOB_STATE_QUEUED, timeout=30)
        assert "requeued: miner miner-1 did not reconnect within 3 s" in network.log("coordinator").read_text()
        network.start_miner("miner2")
        await state_is(clients, job.job_id, cpb.JOB_STATE_RUNNING)
        assert (await get(clients, job.job_id)).miner_id == "miner-2"
        await proxy.restore()
        final = await ended(clients, job.job_id)
        assert final.state == cpb.JOB_STATE_SETTLED, final.status_detail
        assert (final.miner_id, final.attempts) == ("miner-2", 2)

        async def told() -> None:
            assert "lease no longer valid" in network.log("miner").read_text()

        await eventually(told, timeout=60)
        await books_balance(clients, minted, [final], {"miner": "miner-1", "miner2": "miner-2"})
    network.stop_all()
    wallet_check(network)


# -- retention -----------------------------------------------------------------


async def fetch_result(clients: Clients, job_id: str) -> bytes:
    data = b""
    async for chunk in clients.coord.GetJobResult(
        cpb.GetJobResultRequest(job_id=job_id), metadata=md(clients.net.ids["client"]), timeout=30
    ):
        data += chunk.data
    return data


async def refused(call: Awaitable[object]) -> tuple[grpc.StatusCode | None, str]:
    """(code, ErrorInfo reason) the call failed with; (None, "") if it did not."""
    try:
        await call
    except grpc.aio.AioRpcError as err:
        return err.code(), status_details(err)[0]
    return None, ""


async def test_retention_deletes_expired_results_and_rows_but_not_a_blob_a_kept_job_shares(network: Network) -> None:
    """Results kept 25 s after their job ended and rows 50 s, swept every
    half second. Jobs a and b return the same bytes (one blob); c another.
    When a's result expires the shared blob stays for b, and c's young one
    stays; when b's and c's expire both files go, and then the rows. The
    blob metric follows the folder; the books do not move."""
    keep, rows = 25.0, 50.0
    network.start_wallet()
    network.start_coordinator(
        "--result-retention-days", f"{keep / 86400:.9f}", "--job-retention-days", f"{rows / 86400:.9f}",
        "--retention-sweep-secs", "0.5",
    )  # fmt: skip
    network.start_miner("miner")
    blobs = network.root / "blobs"
    minted = 100_000_000
    async with connected(network) as clients:
        await clients.mint("client", minted)
        a = await ended(clients, (await clients.submit(matmul_spec(n=64))).job_id)
        await asyncio.sleep(12)
        b = await ended(clients, (await clients.submit(matmul_spec(n=64))).job_id)
        c = await ended(clients, (await clients.submit(matmul_spec(n=80))).job_id)
        assert a.state == b.state == c.state == cpb.JOB_STATE_SETTLED
        assert a.output_sha256 == b.output_sha256 != c.output_sha256
        shared, young = blobs / a.output_sha256.hex(), blobs / c.output_sha256.hex()
        assert shared.stat().st_size == 64 * 64 * 4 and young.stat().st_size == 80 * 80 * 4

        async def measured(count: int, size: int) -> None:
            samples = scrape(network, "coordinator")
            assert (value(samples, "aitbc_result_blobs"), value(samples, "aitbc_result_blobs_bytes")) == (count, size)

        await eventually(partial(measured, 2, (64 * 64 + 80 * 80) * 4), timeout=10)
        before_a = await fetch_result(clients, a.job_id)

        async def a_expired() -> None:
            assert await refused(fetch_result(clients, a.job_id)) == (
                grpc.StatusCode.FAILED_PRECONDITION, "RESULT_EXPIRED",
            )  # fmt: skip

        await eventually(a_expired, timeout=60, interval=0.2)
        # b ended 12 s after a: its result, and so the blob, is still kept.
        assert shared.exists() and young.exists()
        assert await fetch_result(clients, b.job_id) == before_a
        assert (await get(clients, a.job_id)).state == cpb.JOB_STATE_SETTLED  # the row outlives the result

        async def all_gone() -> None:
            assert not shared.exists() and not young.exists()

        await eventually(all_gone, timeout=60, interval=0.2)
        for job in (b, c):
            assert await refused(fetch_result(clients, job.job_id)) == (
                grpc.StatusCode.FAILED_PRECONDITION, "RESULT_EXPIRED",
            )  # fmt: skip
        await eventually(partial(measured, 0, 0), timeout=10)
        samples = scrape(network, "coordinator")
        assert value(samples, "aitbc_result_blobs_deleted_total") == 2

        async def rows_gone() -> None:
            listed = await clients.coord.ListJobs(cpb.ListJobsRequest(), metadata=md(network.ids["client"]))
            assert not listed.jobs, [j.job_id for j in listed.jobs]

        await eventually(rows_gone, timeout=90, interval=0.5)
        assert await refused(get(clients, a.job_id)) == (grpc.StatusCode.NOT_FOUND, "JOB_NOT_FOUND")
        await books_balance(clients, minted, [a, b, c], {"miner": "miner-1"})
    log = network.log("coordinator").read_text()
    assert '"event": "rpc_internal_error"' not in log
    network.stop_all()
    wallet_check(network)


# -- the coordinator's clock stepped -------------------------------------------


def libfaketime() -> Path | None:
    for lib in sorted(Path("/usr/lib").glob("*/faketime/libfaketimeMT.so.1")):
        return lib
    return None


def faketime_env(spec: Path) -> dict[str, str]:
    """libfaketime (the Debian package) under the coordinator only, its
    offset read from `spec` at every call, so the test can step the wall
    clock of a running process. CLOCK_MONOTONIC is left alone: a real
    clock step moves CLOCK_REALTIME only."""
    lib = libfaketime()
    if lib is None:
        if os.environ.get("AITBC_REQUIRE_FAKETIME") == "1":
            pytest.fail("libfaketime is required here (apt-get install faketime)")
        pytest.skip("libfaketime not installed (apt-get install faketime)")
    return {
        "LD_PRELOAD": str(lib),
        "FAKETIME_TIMESTAMP_FILE": str(spec),
        "FAKETIME_NO_CACHE": "1",
        "DONT_FAKE_MONOTONIC": "1",  # 0.9.10's name; later releases read the next
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }


class QuietMiner:
    """A miner from the test: takes one job, says it runs it, and heartbeats
    only while `beating`: silent on an open stream, as a paused sidecar."""

    def __init__(self, net: Network, name: str = "miner3") -> None:
        self.net = net
        self.ident = net.ids[name]
        self.beating = True
        self.assignment: asyncio.Future[cpb.Assignment] = asyncio.get_running_loop().create_future()
        self.cancelled: list[str] = []
        self._out: asyncio.Queue[cpb.ConnectRequest] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> QuietMiner:
        assert self.ident.key is not None
        self._out.put_nowait(
            cpb.ConnectRequest(
                hello=cpb.MinerHello(
                    miner_id=self.ident.principal.miner_id,
                    public_key=self.ident.key.public_key,
                    payout_address=self.ident.address,
                    capabilities=cpb.Capabilities(workloads=["matmul"], slots=1, accel=cpb.ACCEL_KIND_CPU),
                )
            )
        )

        async def requests() -> AsyncIterator[cpb.ConnectRequest]:
            while True:
                yield await self._out.get()

        self._channel = grpc.aio.insecure_channel(self.net.coord_target)
        stub = coordinator_pb2_grpc.MinerGatewayServiceStub(self._channel)
        self._call = stub.Connect(requests(), metadata=md(self.ident))
        self._tasks = [asyncio.create_task(self._read()), asyncio.create_task(self._heartbeats())]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self._tasks:
            task.cancel()
        self._call.cancel()
        await self._channel.close()

    async def _read(self) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError):  # closed on it, as the test may mean to
            await self._read_all()

    async def _read_all(self) -> None:
        async for msg in self._call:
            kind = msg.WhichOneof("msg")
            if kind == "assignment" and not self.assignment.done():
                lease_id = msg.assignment.lease_id
                self._out.put_nowait(cpb.ConnectRequest(accepted=cpb.AssignmentAccepted(lease_id=lease_id)))
                self.assignment.set_result(msg.assignment)
            elif kind == "cancel":
                self.cancelled.append(msg.cancel.reason)

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            if self.beating:
                self._out.put_nowait(cpb.ConnectRequest(heartbeat=cpb.MinerHeartbeat(free_slots=0)))


@pytest.mark.parametrize("step", ["-1h", "+1h"])
async def test_a_clock_step_on_the_coordinator_moves_no_lease_retry_or_watch(network: Network, step: str) -> None:
    """The coordinator's wall clock steps an hour back or forward (libfaketime)
    while a miner holds a lease, a settlement waits for the wallet and a
    client watches. A miner that heartbeats keeps its lease; one that falls
    silent loses it within a few leases; the settlement lands once the
    wallet is back; the watcher sees every state to the end."""
    clock = network.root / "clock"
    clock.write_text("+0\n")
    network.start_wallet()
    wallet_port = network.ports["wallet"]
    network.start_coordinator(
        "--lease-secs", "6", "--heartbeat-secs", "1", "--reconnect-grace-secs", "6", env=faketime_env(clock)
    )
    minted = 100_000_000
    async with connected(network) as clients, QuietMiner(network) as quiet:
        await clients.mint("client", minted)
        held = await clients.submit(matmul_spec(n=64))
        assert (await asyncio.wait_for(quiet.assignment, 30)).job_id == held.job_id
        await state_is(clients, held.job_id, cpb.JOB_STATE_RUNNING)
        watcher = asyncio.create_task(clients.watch(held.job_id))
        # A verdict waiting for the wallet, its retries scheduled before the step.
        paid = await clients.submit(matmul_spec(n=48))
        network.stop("wallet", signal.SIGKILL)
        network.start_miner("miner")
        await state_is(clients, paid.job_id, cpb.JOB_STATE_SETTLING)
        await asyncio.sleep(3)

        # The step, between two heartbeats: a lease read on the wall clock
        # lapses at once forward, never back.
        quiet.beating = False
        await asyncio.sleep(1.5)
        clock.write_text(f"{step}\n")
        await asyncio.sleep(2)
        quiet.beating = True
        await asyncio.sleep(8)
        job = await get(clients, held.job_id)
        assert (job.state, job.miner_id, job.attempts) == (cpb.JOB_STATE_RUNNING, "miner-3", 1), job.status_detail
        assert not quiet.cancelled

        quiet.beating = False  # paused: its lease goes to the miner that works

        async def lapsed() -> None:
            assert quiet.cancelled == ["lease lapsed"]

        await eventually(lapsed, timeout=30, interval=0.2)
        await state_is(clients, held.job_id, cpb.JOB_STATE_SETTLING)
        network.start_wallet(port=wallet_port)
        final = [await ended(clients, j.job_id, timeout=90) for j in (held, paid)]
        assert [j.state for j in final] == [cpb.JOB_STATE_SETTLED] * 2, [j.status_detail for j in final]
        assert (final[0].miner_id, final[0].attempts) == ("miner-1", 2)
        seen = [j.state for j in await asyncio.wait_for(watcher, 60)]
        assert seen[-1] == cpb.JOB_STATE_SETTLED and cpb.JOB_STATE_QUEUED in seen[1:], seen
        # The coordinator's clock did step: its times are an hour off ours.
        skew = final[0].update_time.ToNanoseconds() / 1e9 - time.time()
        assert abs(skew - (3600 if step == "+1h" else -3600)) < 300, skew
        await books_balance(clients, minted, final, {"miner": "miner-1", "miner3": "miner-3"})
    network.stop_all()
    wallet_check(network)


async def test_a_revoked_tokens_leases_go_back_at_once_not_after_the_grace(network: Network) -> None:
    """The grace is for links that drop, not for streams closed for cause:
    with a ten-minute grace, a miner whose token is revoked still loses its
    job within seconds, and the job is paid to another."""
    network.start_wallet()
    network.start_coordinator("--lease-secs", "5", "--heartbeat-secs", "0.5", "--reconnect-grace-secs", "600")
    minted = 100_000_000
    async with connected(network) as clients:
        await clients.mint("client", minted)
        async with QuietMiner(network) as quiet:
            job = await clients.submit(matmul_spec(n=64))
            assert (await asyncio.wait_for(quiet.assignment, 30)).job_id == job.job_id
            await state_is(clients, job.job_id, cpb.JOB_STATE_RUNNING)
            revoked_at = time.monotonic()
            revoke(network, "miner3")
            await state_is(clients, job.job_id, cpb.JOB_STATE_QUEUED, timeout=30)
            assert time.monotonic() - revoked_at < 30  # the grace is 600 s
        network.start_miner("miner")
        final = await ended(clients, job.job_id)
        assert (final.state, final.miner_id, final.attempts) == (cpb.JOB_STATE_SETTLED, "miner-1", 2)
        await books_balance(clients, minted, [final], {"miner": "miner-1"})
        assert await clients.balance(quiet.ident.address) == (0, 0)
    assert "requeued: miner miner-3 disconnected" in network.log("coordinator").read_text()
    network.stop_all()
    wallet_check(network)
