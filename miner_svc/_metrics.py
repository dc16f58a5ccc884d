"""The sidecar's own metrics: its jobs, verdicts, earnings and GPUs."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from aitbc.metrics import REGISTRY, gpu_gauges

JOBS = Counter("aitbc_miner_jobs_total", "Jobs this sidecar ran, by outcome", ["outcome"], registry=REGISTRY)
VERDICTS = Counter(
    "aitbc_miner_verdicts_total", "The coordinator's verdicts on this sidecar's results", ["verdict"],
    registry=REGISTRY,
)  # fmt: skip
EARNED = Counter("aitbc_miner_earned_uait_total", "uait earned by accepted results", registry=REGISTRY)
RUNNING = Gauge("aitbc_miner_running_jobs", "Jobs holding a slot or queued for one", registry=REGISTRY)
GPU = gpu_gauges("aitbc_miner_gpu", ["gpu"])
