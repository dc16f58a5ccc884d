"""Workloads run in worker processes, so a crash or a hung kernel takes down
a worker, not the sidecar. Workers are spawned (not forked: CUDA does not
survive a fork) and kept, so torch is imported once."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

from miner_svc._run_matmul import RunOutcome


def run_job(spec_bytes: bytes, device: str, out_path: str) -> RunOutcome:
    """Entry point inside the worker process."""
    from aitbc.v1 import coordinator_pb2
    from aitbc.workloads.registry import workload_of
    from miner_svc._run_matmul import run_matmul

    spec = coordinator_pb2.JobSpec.FromString(spec_bytes)
    workload, params = workload_of(spec)
    if workload.name == "matmul":
        if device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise RuntimeError("torch cannot use CUDA here: check the driver and that torch is a CUDA build")
        return run_matmul(params, device, Path(out_path))
    raise RuntimeError(f"this miner cannot run {workload.name}")


def _warm() -> str:
    import torch

    return str(torch.__version__)


class WorkerPool:
    def __init__(self, slots: int) -> None:
        self._slots = slots
        self._pool = self._new()

    def _new(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=self._slots, mp_context=multiprocessing.get_context("spawn"))

    def warm(self) -> Future[str]:
        return self._pool.submit(_warm)

    def submit(self, spec_bytes: bytes, device: str, out_path: Path) -> Future[RunOutcome]:
        try:
            return self._pool.submit(run_job, spec_bytes, device, str(out_path))
        except RuntimeError:
            # A worker died and broke the pool: replace it and go on.
            self._pool = self._new()
            return self._pool.submit(run_job, spec_bytes, device, str(out_path))

    def shutdown(self) -> None:
        # Workers may be deep in a kernel; they hold nothing worth waiting for.
        processes = list((getattr(self._pool, "_processes", None) or {}).values())
        self._pool.shutdown(wait=False, cancel_futures=True)
        for proc in processes:
            proc.terminate()
        for proc in processes:
            proc.join(timeout=5)
