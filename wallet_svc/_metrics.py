"""The wallet's metrics, read from the ledger when Prometheus scrapes: the
journal is the truth, so the figures are right after a restart and shared by
every wallet process on one database. (The volume sums the journal each
scrape: fine at the sizes we run; a busy network would keep running totals.)"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from aitbc.metrics import REGISTRY
from wallet_svc._ledger import HELD, ISSUANCE, Ledger, Tx


def _figures(ledger: Ledger, tx: Tx) -> dict[str, Any]:
    volume = tx.all(
        "SELECT t.kind, COALESCE(SUM(p.amount), 0) FROM postings p JOIN txns t ON p.txn_id = t.id "
        "WHERE p.amount > 0 AND p.address != ? GROUP BY t.kind",
        (ISSUANCE,),
    )
    held = tx.one("SELECT COALESCE(SUM(amount), 0), COUNT(*) FROM holds WHERE state = ?", (HELD,))
    treasury = ledger.balance(tx, ledger.treasury)
    return {
        "volume": {str(k): int(v) for k, v in volume},
        "minted": ledger.minted(tx),
        "held": (int(held[0]), int(held[1])) if held else (0, 0),
        "treasury": treasury.available + treasury.held,
    }


class WalletCollector(Collector):
    def __init__(self, store: Any, ledger: Ledger) -> None:
        self._store, self._ledger = store, ledger

    def collect(self) -> Iterator[Any]:
        f = self._store.call(lambda tx: _figures(self._ledger, tx), snapshot=True)
        volume = CounterMetricFamily(
            "aitbc_wallet_volume_uait", "uait credited by kind of transaction", labels=["kind"]
        )
        for kind, amount in sorted(f["volume"].items()):
            volume.add_metric([kind], amount)
        yield volume
        for name, doc, value in (
            ("aitbc_wallet_supply_uait", "uait minted in all", f["minted"]),
            ("aitbc_wallet_treasury_balance_uait", "The treasury's balance (fees)", f["treasury"]),
            ("aitbc_wallet_held_uait", "uait in open escrow holds", f["held"][0]),
            ("aitbc_wallet_open_holds", "Open escrow holds", f["held"][1]),
        ):
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], value)
            yield g


def watch_ledger(store: Any, ledger: Ledger) -> None:
    REGISTRY.register(WalletCollector(store, ledger))
