"""WalletService: proto <-> ledger, and nothing more."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

import grpc

from aitbc import crypto
from aitbc.addresses import address_of, check_address
from aitbc.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from aitbc.server import principal
from aitbc.signed import open_signed
from aitbc.timeutil import ts_from_iso
from aitbc.v1 import signing_pb2, wallet_pb2, wallet_pb2_grpc
from wallet_svc._ledger import HELD, RELEASED, SETTLED, Balance, Hold, Settlement, SqliteLedger

T = TypeVar("T")

_STATES = {
    HELD: wallet_pb2.HOLD_STATE_HELD,
    SETTLED: wallet_pb2.HOLD_STATE_SETTLED,
    RELEASED: wallet_pb2.HOLD_STATE_RELEASED,
}


def hold_pb(h: Hold) -> wallet_pb2.Hold:
    msg = wallet_pb2.Hold(
        job_id=h.job_id,
        address=h.address,
        amount=h.amount,
        state=_STATES[h.state],
        miner_amount=h.miner_amount,
        fee_amount=h.fee_amount,
        refunded_amount=h.refunded_amount,
        create_time=ts_from_iso(h.create_time),
    )
    if h.close_time:
        msg.close_time.CopyFrom(ts_from_iso(h.close_time))
    return msg


def balance_pb(b: Balance) -> wallet_pb2.GetBalanceResponse:
    return wallet_pb2.GetBalanceResponse(address=b.address, available=b.available, held=b.held)


class WalletServicer(wallet_pb2_grpc.WalletServiceServicer):
    def __init__(self, ledger: SqliteLedger, *, coordinator_key: bytes, network_id: str) -> None:
        self._ledger = ledger
        self._coordinator_key = coordinator_key
        self._network_id = network_id

    async def _run(self, fn: Callable[[], T]) -> T:
        # SQLite commits fsync; keep them off the event loop.
        return await asyncio.to_thread(fn)

    async def CreateAccount(
        self, request: wallet_pb2.CreateAccountRequest, context: grpc.aio.ServicerContext
    ) -> wallet_pb2.CreateAccountResponse:
        key = crypto.check_public_key(request.public_key)
        address = await self._run(lambda: self._ledger.create_account(address_of(key), key))
        return wallet_pb2.CreateAccountResponse(address=address)

    async def GetBalance(
        self, request: wallet_pb2.GetBalanceRequest, context: grpc.aio.ServicerContext
    ) -> wallet_pb2.GetBalanceResponse:
        address = check_address(request.address)
        return balance_pb(await self._run(lambda: self._ledger.balance(address)))

    async def Mint(self, request: wallet_pb2.MintRequest, context: grpc.aio.ServicerContext) -> wallet_pb2.MintResponse:
        address = check_address(request.address)
        bal = await self._run(lambda: self._ledger.mint(address, request.amount, request.request_id))
        return wallet_pb2.MintResponse(balance=balance_pb(bal))

    async def PlaceHold(
        self, request: wallet_pb2.PlaceHoldRequest, context: grpc.aio.ServicerContext
    ) -> wallet_pb2.PlaceHoldResponse:
        address = check_address(request.address)
        hold = await self._run(lambda: self._ledger.place_hold(request.job_id, address, request.amount))
        return wallet_pb2.PlaceHoldResponse(hold=hold_pb(hold))

    async def SettleHold(
        self, request: wallet_pb2.SettleHoldRequest, context: grpc.aio.ServicerContext
    ) -> wallet_pb2.SettleHoldResponse:
        settlement = self._open_settlement(request.settlement)
        hold = await self._run(lambda: self._ledger.settle_hold(settlement))
        return wallet_pb2.SettleHoldResponse(hold=hold_pb(hold))

    async def ReleaseHold(
        self, request: wallet_pb2.ReleaseHoldRequest, context: grpc.aio.ServicerContext
    ) -> wallet_pb2.ReleaseHoldResponse:
        if not request.job_id:
            raise InvalidArgument("job_id is required", field="job_id")
        hold = await self._run(lambda: self._ledger.release_hold(request.job_id))
        return wallet_pb2.ReleaseHoldResponse(hold=hold_pb(hold))

    def _open_settlement(self, signed: signing_pb2.Signed) -> Settlement:
        if principal().role != "coordinator":
            raise PermissionDenied("only the coordinator settles", reason="ROLE_NOT_ALLOWED")
        body = open_signed(signed, crypto.SETTLEMENT_DOMAIN, self._coordinator_key, signing_pb2.SettlementBody)
        if body.network_id != self._network_id:
            raise FailedPrecondition(
                f"settlement is for network {body.network_id!r}, this wallet serves {self._network_id!r}",
                reason="WRONG_NETWORK",
            )
        check_address(body.client_address, field="settlement.client_address")
        check_address(body.miner_address, field="settlement.miner_address")
        return Settlement(
            job_id=body.job_id,
            client_address=body.client_address,
            miner_address=body.miner_address,
            hold_amount=body.hold_amount,
            miner_amount=body.miner_amount,
            fee_amount=body.fee_amount,
            digest=crypto.sha256(signed.body),
        )
