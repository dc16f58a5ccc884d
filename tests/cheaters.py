"""A miner that speaks the protocol from the test, to return what an honest
sidecar never would: each mode is one way of trying to get paid for work
not done."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np

from aitbc import crypto
from aitbc.signed import seal
from aitbc.timeutil import ts_now
from aitbc.v1 import coordinator_pb2 as cpb
from aitbc.v1 import coordinator_pb2_grpc, signing_pb2, workloads_pb2
from aitbc.workloads.matmul import encode_output, make_inputs
from aitbc.workloads.registry import workload_of
from tests.conftest import Network, md

# Modes:
#   honest        compute matmul properly (a peer whose result leaks)
#   wrong_c       matmul C + 1
#   partial       matmul: only the first half of C's rows, zeros after
#   random        embed: random unit vectors of the right shape
#   replay        return `replay` (another job's output) as this job's
#   copy          the peer's output and receipt (shared["result"]), re-signed
#   replay_receipt  the peer's output and its signed receipt, verbatim
#   flipped_byte  a byte of the signed receipt flipped
#   other_key     receipt signed by a key other than the registered one
#   bad_times     honest matmul, but a receipt with times no clock can show


class CheatingMiner:
    def __init__(
        self,
        net: Network,
        mode: str,
        *,
        ident: str = "cheater",
        replay: bytes = b"",
        shared: dict[str, Any] | None = None,
    ) -> None:
        self.net = net
        self.mode = mode
        self.ident = net.ids[ident]
        assert self.ident.key is not None
        self.key: crypto.KeyPair = self.ident.key
        self.miner_id = self.ident.principal.miner_id
        self.replay = replay
        self.shared = shared if shared is not None else {}

    async def run_one(self) -> cpb.ResultAck:
        """Connect, answer one assignment, return the first ack."""
        out: asyncio.Queue[cpb.ConnectRequest] = asyncio.Queue()

        async def requests() -> AsyncIterator[cpb.ConnectRequest]:
            while True:
                yield await out.get()

        out.put_nowait(
            cpb.ConnectRequest(
                hello=cpb.MinerHello(
                    miner_id=self.miner_id,
                    public_key=self.key.public_key,
                    payout_address=self.ident.address,
                    capabilities=cpb.Capabilities(
                        workloads=["matmul", "embed"],
                        models=[cpb.ModelInfo(workload="embed", name="all-minilm-l6-v2")],
                        slots=1,
                        accel=cpb.ACCEL_KIND_CPU,
                    ),
                )
            )
        )
        async with grpc.aio.insecure_channel(self.net.coord_target) as ch:
            call = coordinator_pb2_grpc.MinerGatewayServiceStub(ch).Connect(requests(), metadata=md(self.ident))
            network_id = ""
            async for msg in call:
                kind = msg.WhichOneof("msg")
                if kind == "welcome":
                    network_id = msg.welcome.network_id
                elif kind == "assignment":
                    self._answer(msg.assignment, network_id, out)
                elif kind == "ack":
                    call.cancel()
                    return msg.ack
        raise AssertionError("stream ended without an ack")

    def _output(self, spec: cpb.JobSpec) -> bytes:
        workload, params = workload_of(spec)
        if self.mode == "replay":
            return self.replay
        if workload.name == "embed":
            assert self.mode == "random", self.mode
            v = np.random.default_rng().normal(size=(len(params.texts), 384)).astype(np.float32)
            v /= np.linalg.norm(v, axis=1, keepdims=True)
            return workloads_pb2.EmbedOutput(dimensions=384, values=v.flatten().tolist()).SerializeToString()
        a32, b32 = make_inputs(params)
        if self.mode == "partial":
            c = np.zeros((params.n, params.n), dtype=np.float32)
            half = params.n // 2
            c[:half] = a32[:half] @ b32
        else:
            c = a32 @ b32
        if self.mode == "wrong_c":
            c = c + 1.0
        return encode_output(params, c)

    def _answer(self, a: cpb.Assignment, network_id: str, out: asyncio.Queue[cpb.ConnectRequest]) -> None:
        spec = cpb.JobSpec.FromString(a.job_spec)
        body = signing_pb2.ReceiptBody(
            network_id=network_id,
            start_time=ts_now(),
            finish_time=ts_now(),
            nonce=secrets.token_bytes(16),
            usage=signing_pb2.Usage(device="cpu"),
        )
        if self.mode == "copy":
            data, peer_body = self.shared["result"]
            body.CopyFrom(peer_body)
        else:
            data = self._output(spec)
        # Bound to this miner's own job, lease and id, as a careful cheater would.
        body.job_id, body.lease_id, body.miner_id = a.job_id, a.lease_id, self.miner_id
        body.job_spec_sha256 = crypto.sha256(a.job_spec)
        body.output_sha256, body.output_size_bytes = crypto.sha256(data), len(data)
        if self.mode == "honest":
            self.shared["result"] = (data, body)
        if self.mode == "bad_times":
            body.usage.run_duration.seconds = -5
            body.finish_time.nanos = -1
        signer = crypto.KeyPair.generate() if self.mode == "other_key" else self.key
        receipt = seal(body, crypto.RECEIPT_DOMAIN, signer)
        if self.mode == "honest":
            self.shared["signed"], self.shared["lease_id"] = receipt, a.lease_id
        if self.mode == "replay_receipt":
            data, receipt = self.shared["result"][0], self.shared["signed"]
        if self.mode == "other_key":
            receipt.public_key = self.key.public_key  # claim to be the registered key
        if self.mode == "flipped_byte":
            flipped = bytearray(receipt.body)
            flipped[len(flipped) // 2] ^= 0x01
            receipt.body = bytes(flipped)
        out.put_nowait(cpb.ConnectRequest(accepted=cpb.AssignmentAccepted(lease_id=a.lease_id)))
        out.put_nowait(cpb.ConnectRequest(chunk=cpb.ResultChunk(lease_id=a.lease_id, offset=0, data=data)))
        out.put_nowait(cpb.ConnectRequest(result=cpb.JobResult(lease_id=a.lease_id, receipt=receipt)))
