"""Checking a miner's result: the receipt's signature and bindings, then the
output itself. Pays nothing on the miner's word."""

from __future__ import annotations

from dataclasses import dataclass

from aitbc import crypto
from aitbc.errors import InvalidArgument
from aitbc.signed import BadSignature, open_signed
from aitbc.v1 import coordinator_pb2, signing_pb2
from aitbc.wellformed import check_times
from aitbc.workloads.registry import workload_of
from coordinator_svc._store import JobRecord

ACCEPTED, BAD_SIGNATURE, BAD_OUTPUT = "ACCEPTED", "BAD_SIGNATURE", "BAD_OUTPUT"
# Passed its own checks; held until other miners' runs agree with it.
PENDING = "PENDING"
# Disagrees with the result other miners agreed on, or copies a receipt.
DISAGREED = "DISAGREED"


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
    output: bytes,
) -> Outcome:
    try:
        body = open_signed(receipt, crypto.RECEIPT_DOMAIN, miner_key, signing_pb2.ReceiptBody)
    except BadSignature as exc:
        return Outcome(BAD_SIGNATURE, f"receipt refused: {exc.message}")
    try:
        # Its usage is shown to the client: a time no conversion accepts
        # would break every reader of the job.
        check_times(body, "receipt.")
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
    digest = crypto.sha256(output)
    if body.output_sha256 != digest or body.output_size_bytes != len(output):
        return Outcome(BAD_OUTPUT, "output does not match the receipt's digest", body)
    spec = coordinator_pb2.JobSpec.FromString(job.spec)
    workload, params = workload_of(spec)
    check = workload.check(params, output)
    if not check.ok:
        return Outcome(BAD_OUTPUT, check.detail, body)
    return Outcome(ACCEPTED, check.detail, body)
