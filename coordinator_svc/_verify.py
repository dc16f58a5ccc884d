"""Checking a miner's result: the receipt's signature and bindings, then the
output itself. Pays nothing on the miner's word."""

from __future__ import annotations

from dataclasses import dataclass

from aitbc import crypto
from aitbc.errors import InvalidArgument
from aitbc.signed import open_signed
from aitbc.v1 import coordinator_pb2, signing_pb2
from aitbc.workloads.registry import workload_of
from coordinator_svc._store import JobRecord

ACCEPTED, BAD_SIGNATURE, BAD_OUTPUT = "ACCEPTED", "BAD_SIGNATURE", "BAD_OUTPUT"
# Passed its own checks; held until other miners' runs agree with it.
PENDING = "PENDING"
# Disagrees with the result other miners agreed on, or copies a receipt.
DISAGREED = "DISAGREED"
# Held for agreement, then its miner lost every token: never paid.
WITHDRAWN = "WITHDRAWN"


@dataclass(frozen=True)
class Outcome:
    verdict: str
    detail: str
    body: signing_pb2.ReceiptBody | None = None


def check_result(
    *,
    network_id: str,
    job: JobRecord,
    lease_id: str,
    miner_key: bytes,
    receipt: signing_pb2.Signed,
    output_size: int,
    output_sha256: bytes,
) -> Outcome:
    """The receipt, and that it names the output that was uploaded (its size
    and digest, taken as it streamed in): nothing here reads the output.
    ACCEPTED means the output may now be checked (Workload.check_file)."""
    try:
        # Its fields are checked too: a time no conversion accepts would
        # break every reader of the job its usage is shown on.
        body = open_signed(receipt, crypto.RECEIPT_DOMAIN, miner_key, signing_pb2.ReceiptBody, "receipt")
    except InvalidArgument as exc:
        return Outcome(BAD_SIGNATURE, f"receipt refused: {exc.message}")
    bindings = {
        "network_id": (body.network_id, network_id),
        "job_id": (body.job_id, job.job_id),
        "lease_id": (body.lease_id, lease_id),
        "miner_id": (body.miner_id, job.miner_id),
        "job_spec_sha256": (body.job_spec_sha256, job.spec_sha256),
    }
    for name, (got, want) in bindings.items():
        if got != want:
            return Outcome(BAD_SIGNATURE, f"receipt binds the wrong {name}", body)
    if len(body.nonce) < 16:
        return Outcome(BAD_SIGNATURE, "receipt nonce is shorter than 16 bytes", body)
    if body.output_sha256 != output_sha256 or body.output_size_bytes != output_size:
        return Outcome(BAD_OUTPUT, "output does not match the receipt's digest", body)
    return Outcome(ACCEPTED, "receipt checked", body)


def unread_size_problem(job: JobRecord, size: int, limit_exceeded: bool) -> str:
    """Why an upload of `size` bytes cannot be this job's output, decided
    before a byte of it is read; "" when its size is possible."""
    workload, params = workload_of(coordinator_pb2.JobSpec.FromString(job.spec))
    if limit_exceeded:
        return (
            f"output exceeds the {workload.max_output_size(params)} bytes this job's can have "
            "(or arrived out of order): refused unread"
        )
    exact = workload.exact_output_size(params)
    if exact is not None and size != exact:
        return f"output is {size} bytes; this job's is exactly {exact}: refused unread"
    return ""
