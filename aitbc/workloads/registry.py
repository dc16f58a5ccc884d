"""The workloads the network knows, looked up by the JobSpec oneof name, and
the verification policy a job resolves to.

Adding a workload means a module beside matmul.py and one entry here; the
scheduler and the ledger never change."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from aitbc.errors import InvalidArgument
from aitbc.v1 import coordinator_pb2
from aitbc.workloads.base import Workload
from aitbc.workloads.embed import Embed
from aitbc.workloads.llm_gen import LlmGen
from aitbc.workloads.matmul import Matmul
from aitbc.workloads.sd_infer import SdInfer

WORKLOADS: dict[str, Workload[Any]] = {w.name: w for w in (Matmul(), LlmGen(), Embed(), SdInfer())}
MAX_REDUNDANCY = 5
DEFAULT_REDUNDANCY = 2
# Largest job spec, serialized: each is stored, read at every dispatch pass
# while it waits, and sent to every miner that runs it. Each workload's own
# limits are per field; this bounds them together (an embed job's texts).
MAX_SPEC_BYTES = 64 * 1024


def workload_of(spec: coordinator_pb2.JobSpec) -> tuple[Workload[Any], Any]:
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


@dataclass(frozen=True)
class Policy:
    """A job's verification policy, resolved: `runs` agreeing results from
    different miners are needed before it is paid."""

    message: coordinator_pb2.VerificationPolicy
    runs: int


def policy_of(workload: Workload[Any], spec: coordinator_pb2.JobSpec, rng: random.Random | None = None) -> Policy:
    """The job's policy (the workload's default when the spec sets none).
    A spot check is sampled here, once, so the price is known up front."""
    v = spec.verification
    kind = v.WhichOneof("policy")
    if kind is None:
        if workload.self_checking:
            return Policy(coordinator_pb2.VerificationPolicy(freivalds=coordinator_pb2.FreivaldsPolicy()), 1)
        v = coordinator_pb2.VerificationPolicy(redundant=coordinator_pb2.RedundantPolicy(k=DEFAULT_REDUNDANCY))
        kind = "redundant"
    if kind == "freivalds":
        if not workload.self_checking:
            raise InvalidArgument(
                f"{workload.name} output cannot be checked by Freivalds' algorithm: use redundant or spot_check",
                field="spec.verification.freivalds",
            )
        return Policy(v, 1)
    if kind == "redundant":
        if not 2 <= v.redundant.k <= MAX_REDUNDANCY:
            raise InvalidArgument(
                f"spec.verification.redundant.k must be in 2..{MAX_REDUNDANCY}, got {v.redundant.k}",
                field="spec.verification.redundant.k",
            )
        return Policy(v, v.redundant.k)
    p = v.spot_check.probability
    if not 0.0 < p <= 1.0:
        raise InvalidArgument(
            f"spec.verification.spot_check.probability must be in (0, 1], got {p}",
            field="spec.verification.spot_check.probability",
        )
    return Policy(v, 2 if (rng or random.SystemRandom()).random() < p else 1)
