"""WalletService: proto <-> ledger, and nothing more."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable
from typing import TypeVar

import grpc

from aitbc import crypto
from aitbc.addresses import address_of, check_address
from aitbc.audit import audit
from aitbc.errors import AitbcError, FailedPrecondition, InvalidArgument, PermissionDenied
from aitbc.server import principal
from aitbc.signed import open_signed
from aitbc.timeutil import ts_from_iso
from aitbc.v1 import errors_pb2, signing_pb2, wallet_pb2, wallet_pb2_grpc
from wallet_svc._ledger import (
    HELD,
    INT64_MAX,
    RELEASED,
    SETTLED,
    Balance,
    Entry,
    Hold,
    Ledger,
    Settlement,
    Transfer,
    Tx,
)
from wallet_svc._stores import LedgerStore

T = TypeVar("T")

MAX_BATCH = 1000
MAX_PAGE = 500

_STATES = {
    HELD: wallet_pb2.HOLD_STATE_HELD,
    SETTLED: wallet_pb2.HOLD_STATE_SETTLED,
    RELEASED: wallet_pb2.HOLD_STATE_RELEASED,
}
_KINDS = {
    "mint": wallet_pb2.TRANSACTION_KIND_MINT,
    "transfer": wallet_pb2.TRANSACTION_KIND_TRANSFER,
    "hold": wallet_pb2.TRANSACTION_KIND_HOLD,
    "settle": wallet_pb2.TRANSACTION_KIND_SETTLE,
    "release": wallet_pb2.TRANSACTION_KIND_RELEASE,
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


def entry_pb(e: Entry) -> wallet_pb2.Transaction:
    return wallet_pb2.Transaction(
        transaction_id=e.txn_id,
        kind=_KINDS[e.kind],
        available_delta=e.available_delta,
        held_delta=e.held_delta,
        counterparty=e.counterparty,
        job_id=e.job_id,
        create_time=ts_from_iso(e.create_time),
    )


def _page_token(txn_id: int) -> str:
    return base64.urlsafe_b64encode(f"before:{txn_id}".encode()).decode()


def _parse_page_token(token: str) -> int | None:
    if not token:
        return None
    try:
        kind, _, value = base64.urlsafe_b64decode(token.encode()).decode().partition(":")
        # Transaction ids are positive int64s: anything else would overflow
        # the store's integer (INTERNAL) or match nothing.
        if kind == "before" and 0 < int(value) <= INT64_MAX:
            return int(value)
    except (ValueError, UnicodeDecodeError):
        pass
    raise InvalidArgument("page_token is not one this service issued", field="page_token")


class WalletServicer(wallet_pb2_grpc.WalletServiceServicer):
    def __init__(self, store: LedgerStore, ledger: Ledger, *, coordinator_key: bytes, network_id: str) -> None:
        self._store = store
        self._ledger = ledger
        self._coordinator_key = coordinator_key
        self._network_id = network_id

    async def _run(self, op: Callable[[Tx], T]) -> T:
        return await self._store.run(op)

    async def CreateAccount(
        self, request: wallet_pb2.CreateAccountRequest, context: grpc.aio.ServicerContext
    ) -> wallet_pb2.CreateAccountResponse:
        key = crypto.check_public_key(request.public_key)
        address = await self._run(lambda tx: self._ledger.create_account(tx, address_of(key), key))
        return wallet_pb2.CreateAccountResponse(address=address)

    async def GetBalance(
        self, request: wallet_pb2.GetBalanceRequest, context: grpc.aio.ServicerContext
    ) -> wallet_pb2.GetBalanceResponse:
        address = check_address(request.address)
        return balance_pb(await self._run(lambda tx: self._ledger.balance(tx, address)))

    async def Mint(self, request: wallet_pb2.MintRequest, context: grpc.aio.ServicerContext) -> wallet_pb2.MintResponse:
        address = check_address(request.address)
        bal = await self._run(lambda tx: self._ledger.mint(tx, address, request.amount, request.request_id))
        audit("mint", by=principal().name, address=address, amount=request.amount, request_id=request.request_id)
        return wallet_pb2.MintResponse(balance=balance_pb(bal))

    async def PlaceHold(
        self, request: wallet_pb2.PlaceHoldRequest, context: grpc.aio.ServicerContext
    ) -> wallet_pb2.PlaceHoldResponse:
        address = check_address(request.address)
        hold = await self._run(lambda tx: self._ledger.place_hold(tx, request.job_id, address, request.amount))
        return wallet_pb2.PlaceHoldResponse(hold=hold_pb(hold))

    async def SettleHold(
        self, request: wallet_pb2.SettleHoldRequest, context: grpc.aio.ServicerContext
    ) -> wallet_pb2.SettleHoldResponse:
        try:
            settlement = self._open_settlement(request.settlement)
            hold = await self._run(lambda tx: self._ledger.settle_hold(tx, settlement))
        except AitbcError as err:
            audit("settlement_refused", code=err.code, reason=err.reason, detail=err.message)
            raise
        return wallet_pb2.SettleHoldResponse(hold=hold_pb(hold))

    async def SettleHolds(
        self, request: wallet_pb2.SettleHoldsRequest, context: grpc.aio.ServicerContext
    ) -> wallet_pb2.SettleHoldsResponse:
        if len(request.settlements) > MAX_BATCH:
            raise InvalidArgument(f"at most {MAX_BATCH} settlements per call", field="settlements")

        async def one(signed: signing_pb2.Signed) -> wallet_pb2.SettleHoldResult:
            job_id = ""
            try:
                s = self._open_settlement(signed)
                job_id = s.job_id
                hold = await self._run(lambda tx: self._ledger.settle_hold(tx, s))
                return wallet_pb2.SettleHoldResult(job_id=job_id, hold=hold_pb(hold))
            except AitbcError as err:
                audit("settlement_refused", job_id=job_id, code=err.code, reason=err.reason, detail=err.message)
                return wallet_pb2.SettleHoldResult(
                    job_id=job_id, error=errors_pb2.ErrorDetail(code=err.code, reason=err.reason, message=err.message)
                )

        results = await asyncio.gather(*(one(s) for s in request.settlements))
        return wallet_pb2.SettleHoldsResponse(results=results)

    async def ReleaseHold(
        self, request: wallet_pb2.ReleaseHoldRequest, context: grpc.aio.ServicerContext
    ) -> wallet_pb2.ReleaseHoldResponse:
        if not request.job_id:
            raise InvalidArgument("job_id is required", field="job_id")
        hold = await self._run(lambda tx: self._ledger.release_hold(tx, request.job_id))
        return wallet_pb2.ReleaseHoldResponse(hold=hold_pb(hold))

    async def Transfer(
        self, request: wallet_pb2.TransferRequest, context: grpc.aio.ServicerContext
    ) -> wallet_pb2.TransferResponse:
        signed = request.transfer
        body = open_signed(signed, crypto.TRANSFER_DOMAIN, None, signing_pb2.TransferBody, "transfer")
        self._check_network("transfer", body.network_id)
        check_address(body.from_address, field="transfer.from_address")
        check_address(body.to_address, field="transfer.to_address")
        if address_of(crypto.check_public_key(signed.public_key, field="transfer.public_key")) != body.from_address:
            raise PermissionDenied("the transfer is not signed by the sender's key", reason="NOT_SENDERS_KEY")
        if not 1 <= len(body.request_id) <= 128:
            raise InvalidArgument("request_id must be 1..128 characters", field="transfer.request_id")
        if len(body.memo) > 256:
            raise InvalidArgument("memo is longer than 256 characters", field="transfer.memo")
        t = Transfer(body.from_address, body.to_address, body.amount, body.request_id, crypto.sha256(signed.body))
        txn_id, balance = await self._run(lambda tx: self._ledger.transfer(tx, t))
        return wallet_pb2.TransferResponse(transaction_id=txn_id, sender_balance=balance_pb(balance))

    async def ListTransactions(
        self, request: wallet_pb2.ListTransactionsRequest, context: grpc.aio.ServicerContext
    ) -> wallet_pb2.ListTransactionsResponse:
        address = check_address(request.address)
        caller = principal()
        if caller.role != "admin" and caller.address != address:
            raise PermissionDenied("you may read only your own account's history", reason="NOT_YOUR_ACCOUNT")
        if request.page_size < 0:
            raise InvalidArgument("page_size must not be negative", field="page_size")
        size = min(request.page_size or 50, MAX_PAGE)
        before = _parse_page_token(request.page_token)
        entries = await self._run(lambda tx: self._ledger.history(tx, address, before, size + 1))
        page, more = entries[:size], len(entries) > size
        return wallet_pb2.ListTransactionsResponse(
            transactions=[entry_pb(e) for e in page],
            next_page_token=_page_token(page[-1].txn_id) if more else "",
        )

    def _check_network(self, what: str, network_id: str) -> None:
        if network_id != self._network_id:
            raise FailedPrecondition(
                f"{what} is for network {network_id!r}, this wallet serves {self._network_id!r}",
                reason="WRONG_NETWORK",
            )

    def _open_settlement(self, signed: signing_pb2.Signed) -> Settlement:
        body = open_signed(
            signed, crypto.SETTLEMENT_DOMAIN, self._coordinator_key, signing_pb2.SettlementBody, "settlement"
        )
        self._check_network("settlement", body.network_id)
        check_address(body.client_address, field="settlement.client_address")
        check_address(body.miner_address, field="settlement.miner_address")
        for i, payout in enumerate(body.co_payouts):
            check_address(payout.address, field=f"settlement.co_payouts[{i}].address")
        return Settlement(
            job_id=body.job_id,
            client_address=body.client_address,
            miner_address=body.miner_address,
            hold_amount=body.hold_amount,
            miner_amount=body.miner_amount,
            fee_amount=body.fee_amount,
            digest=crypto.sha256(signed.body),
            co_payouts=tuple((p.address, p.amount) for p in body.co_payouts),
        )
