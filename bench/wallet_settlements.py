"""Settlements per second through the wallet process, over gRPC, on SQLite
and PostgreSQL, with 1 and 16 concurrent callers, and through the batched
SettleHolds call. Each run starts a fresh wallet on a fresh database."""

from __future__ import annotations

import asyncio
import secrets
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from aitbc import crypto
from aitbc.localnet import Network, make_network
from aitbc.signed import seal
from aitbc.v1 import signing_pb2, wallet_pb2, wallet_pb2_grpc

RUNS = 5


def _md(net: Network, who: str) -> Any:
    return (("authorization", f"Bearer {net.ids[who].token}"),)


async def _prepare(net: Network, stub: Any, n: int) -> list[signing_pb2.Signed]:
    client, miner = net.ids["client"].address, net.ids["miner"].address
    await stub.Mint(
        wallet_pb2.MintRequest(address=client, amount=10**15, request_id="bench"), metadata=_md(net, "admin")
    )
    jobs = [f"bench-{secrets.token_hex(6)}" for _ in range(n)]
    sem = asyncio.Semaphore(32)

    async def hold(job: str) -> None:
        async with sem:
            await stub.PlaceHold(
                wallet_pb2.PlaceHoldRequest(job_id=job, address=client, amount=10_000),
                metadata=_md(net, "coordinator"),
            )

    await asyncio.gather(*(hold(j) for j in jobs))
    return [
        seal(
            signing_pb2.SettlementBody(
                network_id="aitbc-devnet",
                job_id=job,
                client_address=client,
                miner_address=miner,
                hold_amount=10_000,
                miner_amount=9_000,
                fee_amount=500,
                receipt_sha256=secrets.token_bytes(32),
            ),
            crypto.SETTLEMENT_DOMAIN,
            net.coordinator_key,
        )
        for job in jobs
    ]


async def _measure(net: Network, mode: str, callers: int, n: int, batch_size: int = 500) -> float:
    async with grpc.aio.insecure_channel(net.wallet_target) as channel:
        stub = wallet_pb2_grpc.WalletServiceStub(channel)
        settlements = await _prepare(net, stub, n)
        md = _md(net, "coordinator")
        queue = list(settlements)

        async def unary_worker() -> None:
            while queue:
                s = queue.pop()
                await stub.SettleHold(wallet_pb2.SettleHoldRequest(settlement=s), metadata=md)

        async def batch_worker() -> None:
            while queue:
                batch = [queue.pop() for _ in range(min(batch_size, len(queue)))]
                resp = await stub.SettleHolds(wallet_pb2.SettleHoldsRequest(settlements=batch), metadata=md)
                assert not any(r.error.code for r in resp.results)

        worker = unary_worker if mode == "unary" else batch_worker
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(callers)))
        elapsed = time.perf_counter() - start
        bal = await stub.GetBalance(
            wallet_pb2.GetBalanceRequest(address=net.ids["miner"].address), metadata=_md(net, "admin")
        )
        assert bal.available == 9_000 * n, "settlements went missing"
    return n / elapsed


def run(pg_dsn_factory: Callable[[], str] | None) -> list[dict[str, Any]]:
    per_store = [
        ("unary", 1, 1_000),
        ("unary", 16, 4_000),
        ("batched x50", 16, 10_000),
        ("batched x500", 1, 10_000),
    ]
    stores = ["sqlite"] + (["postgres"] if pg_dsn_factory is not None else [])
    cases = [(store, mode, callers, n) for store in stores for mode, callers, n in per_store]
    rows = []
    for store, mode, callers, n in cases:
        rates = []
        for _ in range(RUNS):
            with tempfile.TemporaryDirectory(prefix="aitbc-bench-") as tmp:
                net = make_network(Path(tmp) / "net")
                db = str(Path(tmp) / "wallet.sqlite")
                if store == "postgres":
                    assert pg_dsn_factory is not None
                    db = pg_dsn_factory()
                try:
                    net.start_wallet(db=db)
                    batch = int(mode.split("x")[1]) if mode.startswith("batched") else 1
                    kind = "unary" if mode == "unary" else "batch"
                    rates.append(asyncio.run(_measure(net, kind, callers, n, batch)))
                finally:
                    net.stop_all()
        row = {
            "store": store,
            "call": mode,
            "callers": callers,
            "settlements": n,
            "median": statistics.median(rates),
            "runs": rates,
        }
        print(
            f"{store:9} {mode:13} callers={callers:<3} median {row['median']:8.0f}/s  "
            f"runs {', '.join(f'{r:.0f}' for r in rates)}",
            flush=True,
        )
        rows.append(row)
    return rows
