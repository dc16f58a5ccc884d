"""The coordinator's client of the wallet, as its service identity. Every
call has a deadline."""

from __future__ import annotations

import grpc

from aitbc.auth import auth_metadata
from aitbc.errors import AitbcError, FailedPrecondition, Unavailable
from aitbc.rpc import channel, error_reason
from aitbc.tls import TlsConfig
from aitbc.v1 import signing_pb2, wallet_pb2, wallet_pb2_grpc

CALL_TIMEOUT = 5.0


class WalletError(Exception):
    def __init__(self, code: grpc.StatusCode, reason: str, message: str) -> None:
        super().__init__(f"{code.name} {reason}: {message}")
        self.code = code
        self.reason = reason
        self.message = message

    @property
    def unreachable(self) -> bool:
        """The wallet did not answer (down, restarting, cut off), rather
        than answered no: the next call would most likely wait as long."""
        return self.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)

    def to_domain(self) -> AitbcError:
        """What a client of the coordinator is told."""
        if self.code == grpc.StatusCode.FAILED_PRECONDITION:
            return FailedPrecondition(f"wallet refused the hold: {self.message}", reason=self.reason or "HOLD_REFUSED")
        return Unavailable(
            "the wallet is unavailable; retry with the same request_id", reason="WALLET_UNAVAILABLE", retry_after=1.0
        )


class WalletClient:
    def __init__(self, target: str, token: str, tls: TlsConfig | None = None) -> None:
        self._channel = channel(target, tls)
        self._stub = wallet_pb2_grpc.WalletServiceStub(self._channel)
        self._md = auth_metadata(token)

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, method: str, request: object) -> object:
        try:
            # wait_for_ready: a wallet that is restarting gets the whole
            # deadline to come back instead of failing the call at once.
            return await getattr(self._stub, method)(
                request, metadata=self._md, timeout=CALL_TIMEOUT, wait_for_ready=True
            )
        except grpc.aio.AioRpcError as err:
            raise WalletError(err.code(), error_reason(err), err.details() or "") from None

    async def place_hold(self, job_id: str, address: str, amount: int) -> wallet_pb2.Hold:
        resp = await self._call("PlaceHold", wallet_pb2.PlaceHoldRequest(job_id=job_id, address=address, amount=amount))
        assert isinstance(resp, wallet_pb2.PlaceHoldResponse)
        return resp.hold

    async def settle(self, settlement: signing_pb2.Signed) -> wallet_pb2.Hold:
        resp = await self._call("SettleHold", wallet_pb2.SettleHoldRequest(settlement=settlement))
        assert isinstance(resp, wallet_pb2.SettleHoldResponse)
        return resp.hold

    async def settle_many(self, settlements: list[signing_pb2.Signed]) -> list[wallet_pb2.SettleHoldResult]:
        resp = await self._call("SettleHolds", wallet_pb2.SettleHoldsRequest(settlements=settlements))
        assert isinstance(resp, wallet_pb2.SettleHoldsResponse)
        return list(resp.results)

    async def release(self, job_id: str, reason: str) -> wallet_pb2.Hold:
        resp = await self._call("ReleaseHold", wallet_pb2.ReleaseHoldRequest(job_id=job_id, reason=reason))
        assert isinstance(resp, wallet_pb2.ReleaseHoldResponse)
        return resp.hold
