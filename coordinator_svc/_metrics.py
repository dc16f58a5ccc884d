"""The coordinator's metrics. Jobs by state, queue depth and the settlement
backlog are read from the store at scrape time (the truth, also after a
restart and across replicas); the rest is counted as it happens."""

from __future__ import annotations

import contextlib
import re
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from aitbc.metrics import REGISTRY, gpu_gauges

LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
E2E = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600)

DISPATCH_SECONDS = Histogram(
    "aitbc_dispatch_latency_seconds", "From queued to pushed to a miner", ["workload"], buckets=LATENCY,
    registry=REGISTRY,
)  # fmt: skip
E2E_SECONDS = Histogram("aitbc_job_e2e_seconds", "From submit to settled", ["workload"], buckets=E2E, registry=REGISTRY)
JOB_TRANSITIONS = Counter(
    "aitbc_job_transitions_total", "Jobs entering each state", ["workload", "state"], registry=REGISTRY
)
VERDICTS = Counter("aitbc_verdicts_total", "Results judged, by outcome", ["workload", "verdict"], registry=REGISTRY)
ENERGY_JOULES = Histogram(
    "aitbc_job_energy_joules", "GPU energy of accepted runs, as their receipts report it", ["workload"],
    buckets=(1, 10, 100, 1_000, 10_000, 100_000, 1_000_000), registry=REGISTRY,
)  # fmt: skip
MINER_EARNINGS = Counter(
    "aitbc_miner_earnings_uait_total", "Paid to each miner, in uait (once its settlement is sent)", ["miner_id"],
    registry=REGISTRY,
)  # fmt: skip
MINERS = Gauge("aitbc_miners_connected", "Miner streams open here", registry=REGISTRY)
FREE_SLOTS = Gauge("aitbc_miner_free_slots", "Assignments connected miners can take now", registry=REGISTRY)
# Set by each retention sweep (RETENTION_SWEEP_SECS), which stats every blob.
RESULT_BLOB_BYTES = Gauge("aitbc_result_blobs_bytes", "Bytes of result blobs in BLOBS_DIR", registry=REGISTRY)
RESULT_BLOBS = Gauge("aitbc_result_blobs", "Result blobs in BLOBS_DIR", registry=REGISTRY)
RESULT_BLOBS_DELETED = Counter(
    "aitbc_result_blobs_deleted_total", "Result blobs deleted by retention", registry=REGISTRY
)
# Each miner's GPUs, from its last heartbeat.
GPU = gpu_gauges("aitbc_gpu", ["miner_id", "gpu"])


class StoreCollector(Collector):
    """aitbc_jobs{state,workload} and aitbc_settlement_backlog, from the
    store when Prometheus scrapes."""

    def __init__(self, store: Any) -> None:
        self._store = store

    def collect(self) -> Iterator[GaugeMetricFamily]:
        jobs = GaugeMetricFamily("aitbc_jobs", "Jobs in each state", labels=["state", "workload"])
        for (state, workload), n in self._store.count_by_state().items():
            jobs.add_metric([state, workload], n)
        yield jobs
        backlog = GaugeMetricFamily("aitbc_settlement_backlog", "Settlements and releases not yet delivered")
        backlog.add_metric([], self._store.outbox_backlog())
        yield backlog


def watch_store(store: Any) -> None:
    REGISTRY.register(StoreCollector(store))


# A release as the sidecar names it ("0.1.0", "1.2.3rc1", "0.1.0+g1a2b3c"),
# short enough for a label. A miner may send any string: what does not look
# like this is "other", so hostile hellos cannot mint long or many labels.
_VERSION = re.compile(r"v?[0-9]{1,4}(\.[0-9]{1,4}){1,3}([.+-]?[0-9A-Za-z][0-9A-Za-z.+-]{0,23})?")


def version_label(version: str) -> str:
    if not version:
        return "unknown"
    return version if _VERSION.fullmatch(version) else "other"


class SidecarVersionCollector(Collector):
    """aitbc_miner_sidecar_versions{version}: connected miners per sidecar
    release, counted from the open streams at scrape time, so a label lives
    only while a miner of that version is connected."""

    def __init__(self, versions: Callable[[], Iterable[str]]) -> None:
        self._versions = versions

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "aitbc_miner_sidecar_versions", "Connected miners by sidecar release", labels=["version"]
        )
        for version, n in sorted(Tally(self._versions()).items()):
            family.add_metric([version], n)
        yield family


def watch_sidecar_versions(versions: Callable[[], Iterable[str]]) -> None:
    REGISTRY.register(SidecarVersionCollector(versions))


def gpu_telemetry(miner_id: str, telemetry: Any) -> None:
    for t in telemetry:
        gpu = str(t.index)
        GPU["utilization_percent"].labels(miner_id, gpu).set(t.utilization_percent)
        GPU["memory_used_bytes"].labels(miner_id, gpu).set(t.memory_used_bytes)
        GPU["power_watts"].labels(miner_id, gpu).set(t.power_watts)
        GPU["temperature_celsius"].labels(miner_id, gpu).set(t.temperature_celsius)


def forget_gpus(miner_id: str, indexes: Iterable[int]) -> None:
    for index in indexes:
        for g in GPU.values():
            with contextlib.suppress(KeyError):
                g.remove(miner_id, str(index))
