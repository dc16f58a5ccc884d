"""Each service's Prometheus endpoint, scraped before and after a run of
jobs: the counters and histograms move by what the jobs did, under the
names and labels the dashboard queries."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import AsyncIterator

import grpc
from prometheus_client.parser import text_string_to_metric_families

from aitbc.v1 import coordinator_pb2 as cpb
from aitbc.v1 import coordinator_pb2_grpc, workloads_pb2
from tests.conftest import Network, eventually, md
from tests.test_e2e import Clients, matmul_spec
from tests.test_replay import hello

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(net: Network, name: str) -> Samples:
    ready = (
        net.root / "run" / (f"{name}.port.metrics" if name in ("wallet", "coordinator") else f"{name}.ready.metrics")
    )
    port = int(ready.read_text())
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum over the label sets that include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


async def test_metrics_move_as_jobs_go_through(network: Network, tiny_models: str) -> None:
    network.start_wallet()
    network.start_coordinator()
    network.start_miner("miner")
    network.start_miner("miner2", extra=("--models", tiny_models))
    clients = Clients(network)
    try:
        await clients.mint("client", 10**8)
        before = {name: scrape(network, name) for name in ("coordinator", "wallet", "miner")}
        jobs = [await clients.submit(matmul_spec(n=32)) for _ in range(3)]
        jobs.append(
            await clients.submit(cpb.JobSpec(embed=workloads_pb2.EmbedParams(texts=["a", "b"]), max_price=10**6))
        )
        finals = [(await clients.watch(j.job_id))[-1] for j in jobs]
        assert all(f.state == cpb.JOB_STATE_SETTLED for f in finals)

        async def settled_everywhere() -> None:
            c = scrape(network, "coordinator")
            assert value(c, "aitbc_settlement_backlog") == 0
            assert value(c, "aitbc_jobs", state="SETTLED", workload="matmul") == 3
            assert value(c, "aitbc_jobs", state="SETTLED", workload="embed") == 1

        await eventually(settled_everywhere)
        c, w, m = (scrape(network, name) for name in ("coordinator", "wallet", "miner"))
        b = before["coordinator"]

        def moved(samples: Samples, old: Samples, name: str, **labels: str) -> float:
            return total(samples, name, **labels) - total(old, name, **labels)

        assert moved(c, b, "aitbc_job_transitions_total", workload="matmul", state="SETTLED") == 3
        assert moved(c, b, "aitbc_job_transitions_total", workload="embed", state="QUEUED") >= 2  # requeued once
        assert moved(c, b, "aitbc_dispatch_latency_seconds_count", workload="matmul") == 3
        assert moved(c, b, "aitbc_dispatch_latency_seconds_count", workload="embed") == 2  # two runs
        assert moved(c, b, "aitbc_job_e2e_seconds_count", workload="matmul") == 3
        assert moved(c, b, "aitbc_verdicts_total", workload="matmul", verdict="ACCEPTED") == 3
        assert moved(c, b, "aitbc_verdicts_total", workload="embed", verdict="PENDING") == 1
        assert moved(c, b, "aitbc_verdicts_total", workload="embed", verdict="ACCEPTED") == 2
        assert moved(c, b, "aitbc_rpc_requests_total", method="SubmitJob", code="OK") == 4
        assert moved(c, b, "aitbc_rpc_duration_seconds_count", method="SubmitJob") == 4
        assert value(c, "aitbc_miners_connected") == 2 and value(c, "aitbc_miner_free_slots") >= 2
        earned = total(c, "aitbc_miner_earnings_uait_total")
        assert earned == sum(f.miner_amount for f in finals)
        miner_paid = (await clients.balance(network.ids["miner"].address))[0]
        assert value(c, "aitbc_miner_earnings_uait_total", miner_id="miner-1") == miner_paid

        fees = sum(f.fee_amount for f in finals)
        assert value(w, "aitbc_wallet_treasury_balance_uait") == fees
        assert value(w, "aitbc_wallet_supply_uait") == 10**8
        assert value(w, "aitbc_wallet_held_uait") == 0 and value(w, "aitbc_wallet_open_holds") == 0
        assert value(w, "aitbc_wallet_volume_uait_total", kind="mint") == 10**8
        assert value(w, "aitbc_wallet_volume_uait_total", kind="settle") > earned  # miners + fees + refunds
        assert total(w, "aitbc_rpc_requests_total", service="WalletService", code="OK") > total(
            before["wallet"], "aitbc_rpc_requests_total", service="WalletService", code="OK"
        )
        mb = before["miner"]
        assert moved(m, mb, "aitbc_miner_jobs_total", outcome="finished") >= 1
        assert moved(m, mb, "aitbc_miner_earned_uait_total") == miner_paid
    finally:
        await clients.close()


async def test_gpu_telemetry_from_heartbeats_is_exported_per_miner(network: Network) -> None:
    network.start_wallet()
    network.start_coordinator()
    out: asyncio.Queue[cpb.ConnectRequest] = asyncio.Queue()
    declared = hello(network, "miner3")
    # Telemetry is kept only for the GPUs a hello declares.
    declared.hello.capabilities.accel = cpb.ACCEL_KIND_CUDA
    declared.hello.capabilities.gpus.add(index=0, name="fake", memory_total_bytes=2**34)
    out.put_nowait(declared)
    beat = cpb.MinerHeartbeat(
        free_slots=1,
        telemetry=[cpb.GpuTelemetry(index=0, utilization_percent=87, memory_used_bytes=3 * 2**30,
                                    power_watts=312.5, temperature_celsius=71)],
    )  # fmt: skip

    async def requests() -> AsyncIterator[cpb.ConnectRequest]:
        while True:
            yield await out.get()

    async with grpc.aio.insecure_channel(network.coord_target) as ch:
        call = coordinator_pb2_grpc.MinerGatewayServiceStub(ch).Connect(requests(), metadata=md(network.ids["miner3"]))
        await call.read()  # welcome
        out.put_nowait(cpb.ConnectRequest(heartbeat=beat))

        async def exported() -> None:
            c = scrape(network, "coordinator")
            labels = {"miner_id": "miner-3", "gpu": "0"}
            assert value(c, "aitbc_gpu_power_watts", **labels) == 312.5
            assert value(c, "aitbc_gpu_utilization_percent", **labels) == 87
            assert value(c, "aitbc_gpu_memory_used_bytes", **labels) == 3 * 2**30
            assert value(c, "aitbc_gpu_temperature_celsius", **labels) == 71

        await eventually(exported)
        call.cancel()

    async def forgotten() -> None:
        assert value(scrape(network, "coordinator"), "aitbc_gpu_power_watts", miner_id="miner-3", gpu="0") == 0

    await eventually(forgotten)  # a miner that left has no GPUs here any more
