"""Composition of the wallet server."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from aitbc.auth import TokenTable
from aitbc.config import Option
from aitbc.metrics import metrics_options
from aitbc.server import SERVER_OPTIONS, Service, server_settings
from aitbc.v1 import wallet_pb2, wallet_pb2_grpc
from wallet_svc._ledger import Ledger
from wallet_svc._servicer import WalletServicer
from wallet_svc._stores import LedgerStore

OPTIONS = [
    Option("HOST", str, "127.0.0.1", "address to listen on"),
    Option("PORT", int, 50052, "port to listen on (0 picks a free one)"),
    Option("DB", str, "var/wallet.sqlite", "SQLite ledger file, or a postgresql:// URL"),
    Option("TOKENS_FILE", Path, Path("var/dev/principals.json"), "principals and token hashes (JSON)"),
    Option("COORDINATOR_PUBLIC_KEY", str, "", "hex Ed25519 key whose settlements the wallet accepts"),
    Option("TREASURY_ADDRESS", str, "", "account that collects the coordinator's fee"),
    Option("NETWORK_ID", str, "aitbc-devnet", "network settlements must name"),
    Option("READY_FILE", str, "", "write the bound port here once serving"),
    Option("LOG_LEVEL", str, "info", "debug, info, warning or error"),
    Option("SHUTDOWN_GRACE", float, 5.0, "seconds in-flight calls get on shutdown"),
    *metrics_options(9101),
    *SERVER_OPTIONS,
]


@dataclass
class WalletDeps:
    store: LedgerStore
    ledger: Ledger
    tokens: TokenTable


def build_server(config: dict, deps: WalletDeps) -> tuple[Service, int]:
    servicer = WalletServicer(
        deps.store,
        deps.ledger,
        coordinator_key=bytes.fromhex(config["COORDINATOR_PUBLIC_KEY"]),
        network_id=config["NETWORK_ID"],
    )
    tls, limits = server_settings(config)
    service = Service(
        tls=tls,
        limits=limits,
        services=[wallet_pb2.DESCRIPTOR.services_by_name["WalletService"]],
        register=[lambda s: wallet_pb2_grpc.add_WalletServiceServicer_to_server(servicer, s)],
        tokens=deps.tokens,
        host=config["HOST"],
        port=config["PORT"],
    )
    return service, service.port
