"""Preparing a job before a slot is free for it: with PREFETCH the sidecar
holds the next assignment while the current one runs, and makes its inputs
meanwhile, so the slot goes from one job straight into the next.

For matmul that is A and B (generating them costs about as much as a
CPU multiplication at n=2048), written beside the job's output where the
worker reads them back; the model workloads' preparation is the model, which
the worker keeps loaded between jobs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

INPUTS_FILE = "inputs.npy"


def prepare(spec_bytes: bytes, job_dir: Path) -> None:
    from aitbc.v1 import coordinator_pb2
    from aitbc.workloads.matmul import make_inputs
    from aitbc.workloads.registry import workload_of

    workload, params = workload_of(coordinator_pb2.JobSpec.FromString(spec_bytes))
    if workload.name != "matmul":
        return
    a, b = make_inputs(params)
    job_dir.mkdir(parents=True, exist_ok=True)
    tmp = job_dir / (INPUTS_FILE + ".tmp")
    with tmp.open("wb") as f:
        np.save(f, np.stack([a, b]))
    tmp.replace(job_dir / INPUTS_FILE)


def prepared_inputs(job_dir: Path) -> tuple[np.ndarray, np.ndarray] | None:
    path = job_dir / INPUTS_FILE
    if not path.exists():
        return None
    ab = np.load(path)
    return ab[0], ab[1]
