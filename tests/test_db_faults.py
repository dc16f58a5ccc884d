"""The database fails under the services: PostgreSQL crashed and restarted
under load (the wallet and two coordinator replicas on it), the SQLite
ledger's disk fills up, and the audit reads a ledger it may not write.

Answers while the database is away are UNAVAILABLE with ErrorInfo and
RetryInfo, never INTERNAL; health says NOT_SERVING meanwhile; everything
heals without a restart, and no money is lost or paid twice."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aitbc.pg import RETRY_SECS
from aitbc.v1 import coordinator_pb2 as cpb
from aitbc.v1 import coordinator_pb2_grpc, wallet_pb2, wallet_pb2_grpc
from tests.conftest import ROOT, Network, eventually, md
from tests.test_e2e import Clients, matmul_spec
from tests.test_rekey import Stream, get_job

pytestmark = pytest.mark.timeout(300)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def status_details(err: grpc.aio.AioRpcError) -> tuple[str, float | None]:
    """(ErrorInfo reason, RetryInfo delay in seconds or None)."""
    reason, delay = "", None
    for key, value in err.trailing_metadata() or ():
        if key != "grpc-status-details-bin":
            continue
        for d in status_pb2.Status.FromString(value).details:
            if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                d.Unpack(info)
                reason = info.reason
            elif d.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                d.Unpack(retry)
                delay = retry.retry_delay.ToTimedelta().total_seconds()
    return reason, delay


class Seen:
    """Every answer the test's clients got, by service: codes, and the
    details of each UNAVAILABLE."""

    def __init__(self) -> None:
        self.codes: dict[str, Counter[str]] = {}
        self.ok_at: dict[str, list[float]] = {}
        self.unavailable: list[tuple[str, str, float | None]] = []

    async def call(self, target: str, rpc: Callable[[], Awaitable[Any]]) -> Any:
        try:
            result = await rpc()
        except grpc.aio.AioRpcError as err:
            self.codes.setdefault(target, Counter())[err.code().name] += 1
            if err.code() == grpc.StatusCode.UNAVAILABLE:
                reason, delay = status_details(err)
                self.unavailable.append((target, reason, delay))
            return None
        self.codes.setdefault(target, Counter())["OK"] += 1
        self.ok_at.setdefault(target, []).append(time.monotonic())
        return result


async def watch_health(targets: dict[str, str], seen: dict[str, list[int]], stop: asyncio.Event) -> None:
    """Poll each server's overall health; keep each change."""
    channels = {name: grpc.aio.insecure_channel(t) for name, t in targets.items()}
    try:
        while not stop.is_set():
            for name, ch in channels.items():
                with contextlib.suppress(grpc.aio.AioRpcError):
                    resp = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
                    states = seen.setdefault(name, [])
                    if not states or states[-1] != resp.status:
                        states.append(resp.status)
            await asyncio.sleep(0.05)
    finally:
        for ch in channels.values():
            await ch.close()


def wallet_check(network: Network, db: str) -> tuple[int, str]:
    """`python -m wallet_svc check`: (exit status, output)."""
    out = subprocess.run(
        [sys.executable, "-m", "wallet_svc", "check", "--db", db, "--treasury-address", network.treasury],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    return out.returncode, out.stdout + out.stderr


def minted_by_check(output: str) -> int:
    found = re.search(r"minted (\d+) uait, clean", output)
    assert found, output
    return int(found.group(1))


def log_count(network: Network, name: str, event: str) -> int:
    return network.log(name).read_text(errors="replace").count(f'"{event}"')


# -- PostgreSQL restarted under load ----------------------------------------


@pytest.fixture
def own_pg() -> Iterator[Any]:
    """A PostgreSQL server of this test's own: it is crashed and restarted,
    which the session's shared one must not be."""
    from aitbc.pgtemp import PostgresUnavailable, TempPostgres

    try:
        server = TempPostgres().start()
    except PostgresUnavailable as exc:
        if os.environ.get("AITBC_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"PostgreSQL is required here but could not start: {exc}")
        pytest.skip(f"PostgreSQL unavailable: {exc}")
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize(
    "down_secs",
    [
        # pg_ctl restart -m immediate: calls wait it out (aitbc.pg.RETRY_SECS).
        0.0,
        # Away for longer than calls wait: they answer UNAVAILABLE meanwhile.
        RETRY_SECS + 4,
    ],
    ids=["restart", "outage"],
)
async def test_postgres_restart_under_load_heals_without_internal_or_double_pay(
    network: Network, own_pg: Any, down_secs: float
) -> None:
    wallet_db, coord_db = own_pg.new_database(), own_pg.new_database()
    network.start_wallet(db=wallet_db)
    for name in ("coordinator", "coordinator2"):
        network.start_coordinator("--heartbeat-secs", "0.5", coord_db=coord_db, name=name)
    network.start_miner("miner", coordinator="coordinator")
    network.start_miner("miner2", coordinator="coordinator2")
    targets = {"wallet": network.wallet_target, **{n: network.target(n) for n in ("coordinator", "coordinator2")}}
    channels = {name: grpc.aio.insecure_channel(t) for name, t in targets.items()}
    wallet = wallet_pb2_grpc.WalletServiceStub(channels["wallet"])
    coords = {n: coordinator_pb2_grpc.CoordinatorServiceStub(channels[n]) for n in ("coordinator", "coordinator2")}
    admin, client = md(network.ids["admin"]), md(network.ids["client"])
    client_address = network.ids["client"].address
    seen, health = Seen(), dict[str, list[int]]()
    stop_load, stop_health = asyncio.Event(), asyncio.Event()
    jobs: list[str] = []
    minted = 1_000_000_000
    try:
        await wallet.Mint(
            wallet_pb2.MintRequest(address=client_address, amount=minted, request_id="fund"), metadata=admin, timeout=10
        )

        async def submitter(name: str) -> None:
            """Jobs one after another; an UNAVAILABLE is retried with the same
            request_id, as a client should."""
            while not stop_load.is_set():
                request = cpb.SubmitJobRequest(spec=matmul_spec(n=8), request_id=secrets.token_hex(8))
                while True:
                    resp = await seen.call(
                        name, functools.partial(coords[name].SubmitJob, request, metadata=client, timeout=60)
                    )
                    if resp is not None:
                        jobs.append(resp.job.job_id)
                        break
                    await asyncio.sleep(0.2)
                await asyncio.sleep(0.1)

        def list_jobs(name: str) -> Callable[[], Awaitable[Any]]:
            return lambda: coords[name].ListJobs(cpb.ListJobsRequest(page_size=5), metadata=client, timeout=60)

        async def reader(name: str, rpc: Callable[[], Awaitable[Any]]) -> None:
            while not stop_load.is_set():
                await seen.call(name, rpc)
                await asyncio.sleep(0.05)

        load = [
            asyncio.create_task(submitter("coordinator")),
            asyncio.create_task(submitter("coordinator2")),
            asyncio.create_task(
                reader(
                    "wallet",
                    lambda: wallet.GetBalance(
                        wallet_pb2.GetBalanceRequest(address=client_address), metadata=admin, timeout=60
                    ),
                )
            ),
            *(asyncio.create_task(reader(n, list_jobs(n))) for n in coords),
        ]
        watcher = asyncio.create_task(watch_health(targets, health, stop_health))
        await eventually(lambda: _assert(len(jobs) >= 6), timeout=60)

        # Crash the server: every connection is cut.
        down_at = time.monotonic()
        await asyncio.to_thread(own_pg.restart, down_secs)
        back_at = time.monotonic()
        before = len(jobs)
        await eventually(lambda: _assert(len(jobs) >= before + 6), timeout=60)
        stop_load.set()
        await asyncio.gather(*load)

        # Every job submitted settles, through either replica.
        async def all_settled() -> list[cpb.Job]:
            finals = []
            for i, job_id in enumerate(jobs):
                stub = coords["coordinator" if i % 2 else "coordinator2"]
                job = (await stub.GetJob(cpb.GetJobRequest(job_id=job_id), metadata=client, timeout=10)).job
                assert job.state == cpb.JOB_STATE_SETTLED, (job_id, cpb.JobState.Name(job.state), job.status_detail)
                finals.append(job)
            return finals

        finals = await eventually(all_settled, timeout=120, interval=0.5)
        await asyncio.sleep(0.5)  # the health watcher's last look
        stop_health.set()
        await watcher

        recovery = {
            name: round(min((t for t in seen.ok_at.get(name, []) if t >= back_at), default=float("inf")) - back_at, 3)
            for name in targets
        }
        print(
            f"\ndatabase down {back_at - down_at:.2f} s; answers by code: {seen.codes}; "
            f"UNAVAILABLE reasons: {Counter(r for _, r, _ in seen.unavailable)}; "
            f"first OK after the database returned (s): {recovery}; health: "
            f"{ {n: [health_pb2.HealthCheckResponse.ServingStatus.Name(s) for s in h] for n, h in health.items()} }; "
            f"jobs {len(jobs)}"
        )
        # Never INTERNAL, nor anything but an answer or UNAVAILABLE...
        for name, codes in seen.codes.items():
            assert set(codes) <= {"OK", "UNAVAILABLE"}, (name, codes)
        # ...and every UNAVAILABLE says why and when to come back.
        for target, reason, delay in seen.unavailable:
            assert reason and delay is not None and delay > 0, (target, reason, delay)
        if down_secs > RETRY_SECS:
            assert any(r == "DATABASE_UNAVAILABLE" for _, r, _ in seen.unavailable), seen.unavailable
        for name in targets:
            assert "rpc_internal_error" not in network.log(name).read_text(errors="replace"), name
            # Health went NOT_SERVING while the database was away, and back.
            assert NOT_SERVING in health[name] and health[name][-1] == SERVING, (name, health[name])
            assert recovery[name] < 15, recovery

        # Books clean, each job paid exactly once, every uait accounted for.
        code, output = wallet_check(network, wallet_db)
        assert code == 0 and minted_by_check(output) == minted, output
        paid = {f.job_id: f for f in finals}
        assert len(paid) == len(jobs)

        async def balance(address: str) -> tuple[int, int]:
            b = await wallet.GetBalance(wallet_pb2.GetBalanceRequest(address=address), metadata=admin, timeout=10)
            return b.available, b.held

        assert await balance(client_address) == (minted - sum(f.price for f in finals), 0)
        miners = [await balance(network.ids[m].address) for m in ("miner", "miner2")]
        assert sum(a for a, _ in miners) == sum(f.miner_amount for f in finals)
        assert await balance(network.treasury) == (sum(f.fee_amount for f in finals), 0)
    finally:
        stop_load.set()
        stop_health.set()
        for ch in channels.values():
            await ch.close()


def _assert(condition: bool) -> Awaitable[None]:
    async def check() -> None:
        assert condition

    return check()


# -- SQLite on a disk that fills up, or that is read-only --------------------


@contextlib.contextmanager
def small_disk(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` at path. Needs mount privileges (root here and in
    CI, where AITBC_REQUIRE_MOUNT=1 makes their absence a failure)."""
    path.mkdir(parents=True)
    mount = shutil.which("mount")
    out = (
        subprocess.run([mount, "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True)
        if mount
        else None
    )
    if out is None or out.returncode != 0:
        why = out.stderr.strip() if out is not None else "no mount command"
        if os.environ.get("AITBC_REQUIRE_MOUNT") == "1":
            pytest.fail(f"mounting a tmpfs is required here but failed: {why}")
        pytest.skip(f"cannot mount a tmpfs here: {why}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def remount(path: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(path)], check=True, capture_output=True)


def fill(path: Path) -> None:
    """Write until the disk is full."""
    with path.open("wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 4096)


async def wallet_health(network: Network) -> int:
    async with grpc.aio.insecure_channel(network.wallet_target) as ch:
        resp = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
    return int(resp.status)


async def test_a_full_disk_is_unavailable_storage_full_and_heals_when_space_returns(
    network: Network, tmp_path: Path
) -> None:
    """A real full filesystem (a 4 MiB tmpfs), not PRAGMA max_page_count:
    the wallet's commit fails with SQLITE_FULL as it would in production."""
    with small_disk(tmp_path / "disk", "4m") as disk:
        db = str(disk / "wallet.sqlite")
        network.start_wallet(db=db)
        admin = md(network.ids["admin"])
        address = network.ids["client"].address
        async with grpc.aio.insecure_channel(network.wallet_target) as ch:
            wallet = wallet_pb2_grpc.WalletServiceStub(ch)

            async def mint(request_id: str) -> None:
                await wallet.Mint(
                    wallet_pb2.MintRequest(address=address, amount=1000, request_id=request_id),
                    metadata=admin,
                    timeout=10,
                )

            await mint("before")
            fill(disk / "filler")
            refused: grpc.aio.AioRpcError | None = None
            landed = 1
            for i in range(2000):
                try:
                    await mint(f"full-{i}")
                    landed += 1
                except grpc.aio.AioRpcError as err:
                    refused = err
                    break
            assert refused is not None, "the disk never filled"
            assert refused.code() == grpc.StatusCode.UNAVAILABLE, refused
            reason, delay = status_details(refused)
            assert reason == "STORAGE_FULL" and delay, (reason, delay)
            # More refusals: the same answer, and still one line in the log.
            for _ in range(5):
                with pytest.raises(grpc.aio.AioRpcError) as again:
                    await mint(f"full-{i}")
                assert again.value.code() == grpc.StatusCode.UNAVAILABLE
                assert status_details(again.value)[0] == "STORAGE_FULL"

            async def health_is(status: int) -> None:
                assert await wallet_health(network) == status

            await eventually(lambda: health_is(NOT_SERVING), timeout=10)
            assert log_count(network, "wallet", "storage_fault") == 1

            # The audit reads the ledger on the full disk, the wallet running.
            code, output = wallet_check(network, db)
            assert code == 0 and minted_by_check(output) == 1000 * landed, output

            # Space comes back: serving again without a restart, and the
            # refused mint, retried with its request id, lands once.
            (disk / "filler").unlink()
            healed_from = time.monotonic()
            await eventually(lambda: health_is(SERVING), timeout=15)
            print(f"\nserving again {time.monotonic() - healed_from:.2f} s after space was freed")
            await mint(f"full-{i}")
            await mint(f"full-{i}")
            bal = await wallet.GetBalance(wallet_pb2.GetBalanceRequest(address=address), metadata=admin, timeout=10)
            assert (bal.available, bal.held) == (1000 * (landed + 1), 0)
            assert log_count(network, "wallet", "storage_recovered") == 1
            assert "rpc_internal_error" not in network.log("wallet").read_text(errors="replace")
        network.stop("wallet")
        code, output = wallet_check(network, db)
        assert code == 0 and minted_by_check(output) == 1000 * (landed + 1), output


async def test_check_reads_a_ledger_on_a_read_only_disk(network: Network, tmp_path: Path) -> None:
    """The audit opens the ledger read-only and writes nothing: it works on
    a read-only mount, after a crash (commits still in the WAL) and after a
    clean stop (no WAL at all)."""
    with small_disk(tmp_path / "disk", "16m") as disk:
        db = str(disk / "wallet.sqlite")
        admin = md(network.ids["admin"])
        address = network.ids["client"].address

        async def mint(request_id: str, amount: int) -> None:
            async with grpc.aio.insecure_channel(network.wallet_target) as ch:
                await wallet_pb2_grpc.WalletServiceStub(ch).Mint(
                    wallet_pb2.MintRequest(address=address, amount=amount, request_id=request_id),
                    metadata=admin,
                    timeout=10,
                )

        # Killed: its last commits live only in the WAL.
        network.start_wallet(db=db)
        await mint("one", 700)
        network.stop("wallet", signal.SIGKILL)
        assert (disk / "wallet.sqlite-wal").stat().st_size > 0
        remount(disk, "ro")
        code, output = wallet_check(network, db)
        assert code == 0 and minted_by_check(output) == 700, output

        # Stopped cleanly: no WAL left, and none can be made here.
        remount(disk, "rw")
        network.start_wallet(db=db)
        await mint("two", 300)
        network.stop("wallet")
        assert not (disk / "wallet.sqlite-wal").exists()
        remount(disk, "ro")
        before = sorted(p.name for p in disk.iterdir())
        code, output = wallet_check(network, db)
        assert code == 0 and minted_by_check(output) == 1000, output
        assert sorted(p.name for p in disk.iterdir()) == before
        remount(disk, "rw")


# -- the rule for running a call again ---------------------------------------


def test_a_call_that_may_have_committed_runs_again_only_if_idempotent(pg_server: Any) -> None:
    from aitbc.dbfaults import StorageUnavailable, StoreHealth
    from aitbc.pg import ConnectionLost, PgConnections

    pg = PgConnections(pg_server.dsn(), name="t", health=StoreHealth("t"), retry_secs=5.0)
    try:

        def failing_once(at_commit: bool) -> Callable[[], str]:
            calls = []

            def fn() -> str:
                calls.append(1)
                if len(calls) == 1:
                    raise ConnectionLost(at_commit=at_commit)
                return f"run {len(calls)}"

            return fn

        # Failed before COMMIT: nothing happened, so it runs again.
        assert pg.run(failing_once(at_commit=False), idempotent=False) == "run 2"
        # Failed in COMMIT: run again only when running twice is harmless.
        assert pg.run(failing_once(at_commit=True), idempotent=True) == "run 2"
        with pytest.raises(StorageUnavailable) as lost:
            pg.run(failing_once(at_commit=True), idempotent=False)
        assert lost.value.code == "UNAVAILABLE" and lost.value.retry_after > 0
        assert "may have been made" in lost.value.message
    finally:
        pg.close()


async def test_a_job_running_through_a_database_outage_longer_than_its_lease_costs_no_attempt(
    network: Network, own_pg: Any
) -> None:
    """The coordinator's database is away for longer than a lease and the
    reconnect grace together while a miner runs a job, and the result comes
    back in the middle of it. Heartbeats could not be stored: they ended the
    miner's stream, the lease lapsed and the job ran again elsewhere. Now
    the stream and the lease stay, the result waits for the database, and
    the job settles on its first attempt."""
    network.start_wallet()
    network.start_coordinator(
        "--lease-secs", "3", "--heartbeat-secs", "0.5", "--reconnect-grace-secs", "1",
        coord_db=own_pg.new_database(),
    )  # fmt: skip
    clients = Clients(network)
    key = network.ids["miner3"].key
    assert key is not None
    try:
        await clients.mint("client", 10**8)
        job = await clients.submit(matmul_spec(n=16))
        async with Stream(network, "miner3", key, network.coord_target) as miner:

            async def heartbeats() -> None:
                while True:
                    miner.out.put_nowait(cpb.ConnectRequest(heartbeat=cpb.MinerHeartbeat(free_slots=0)))
                    await asyncio.sleep(0.5)

            beating = asyncio.create_task(heartbeats())
            try:
                await miner.next("welcome")
                a = await miner.next("assignment")
                miner.accept(a)

                async def running() -> None:
                    j = await get_job(clients, job.job_id)
                    assert j.state == cpb.JOB_STATE_RUNNING, (cpb.JobState.Name(j.state), j.status_detail)

                await eventually(running, timeout=30)
                outage = asyncio.create_task(asyncio.to_thread(own_pg.restart, 12.0))
                await asyncio.sleep(6)  # lease (3 s) and grace (1 s) both past
                miner.deliver(a)
                await outage
                ack = await miner.next("ack", timeout=60)
                assert ack.verdict == cpb.VERDICT_ACCEPTED, ack
                assert not miner.ended.done(), await miner.status()
            finally:
                beating.cancel()
        final = (await clients.watch(job.job_id))[-1]
        assert (final.state, final.attempts, final.miner_id) == (cpb.JOB_STATE_SETTLED, 1, "miner-3"), final
        assert await clients.balance(network.ids["miner3"].address) == (final.miner_amount, 0)
    finally:
        await clients.close()
    network.stop_all()
    code, output = wallet_check(network, str(network.root / "wallet.sqlite"))
    assert code == 0, output
