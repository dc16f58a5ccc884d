"""The workloads the network knows, looked up by the JobSpec oneof name.

Adding a workload means a module beside matmul.py and one entry here; the
scheduler and the ledger never change."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aitbc.errors import InvalidArgument
from aitbc.v1 import coordinator_pb2, workloads_pb2
from aitbc.workloads import matmul

DTYPE_NAMES = {workloads_pb2.DTYPE_FP32: "fp32", workloads_pb2.DTYPE_FP16: "fp16", workloads_pb2.DTYPE_BF16: "bf16"}


@dataclass(frozen=True)
class Workload:
    name: str
    # JobSpec -> validated params (raises InvalidArgument).
    params: Callable[[coordinator_pb2.JobSpec], Any]
    # The coordinator's own measure of the work, in the price table's unit.
    work_units: Callable[[Any], int]
    # Size in bytes a correct output has (uploads beyond it are refused).
    output_size: Callable[[Any], int]
    # Check an output against the params.
    verify: Callable[[Any, bytes], matmul.Check]


def _matmul_params(spec: coordinator_pb2.JobSpec) -> matmul.MatmulParams:
    p = spec.matmul
    return matmul.MatmulParams(
        n=p.n, dtype=DTYPE_NAMES.get(p.dtype, ""), seed=p.seed, repeats=p.repeats or 1
    ).validate()


WORKLOADS: dict[str, Workload] = {
    "matmul": Workload(
        name="matmul",
        params=_matmul_params,
        work_units=lambda p: p.flops,
        output_size=lambda p: p.output_size,
        verify=matmul.freivalds,
    ),
}


def workload_of(spec: coordinator_pb2.JobSpec) -> tuple[Workload, Any]:
    name = spec.WhichOneof("workload")
    if name is None:
        raise InvalidArgument(
            f"spec must set one workload: {', '.join(sorted(WORKLOADS))}",
            field="spec.workload",
            reason="WORKLOAD_REQUIRED",
        )
    if name not in WORKLOADS:
        raise InvalidArgument(f"workload {name!r} is not supported", field="spec.workload", reason="UNKNOWN_WORKLOAD")
    w = WORKLOADS[name]
    return w, w.params(spec)
