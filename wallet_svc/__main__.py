"""python -m wallet_svc [flags]      serve the wallet
python -m wallet_svc check [flags] recompute every balance from the journal;
                                   exit 1 on any difference."""

from __future__ import annotations

import asyncio
import sys

import structlog

from aitbc import config as cfg
from aitbc.addresses import check_address
from aitbc.auth import TokenTable
from aitbc.crypto import check_public_key
from aitbc.dbfaults import follow_health
from aitbc.logs import setup_logging
from aitbc.metrics import serve_metrics
from aitbc.server import server_settings, wait_for_shutdown_signal, write_ready_file
from aitbc.sqlite import SchemaMismatch
from wallet_svc._ledger import Ledger
from wallet_svc._metrics import watch_ledger
from wallet_svc._stores import LedgerStore, open_store
from wallet_svc.server import OPTIONS, WalletDeps, build_server

log = structlog.get_logger()


def main(argv: list[str]) -> int:
    command = "serve"
    if argv and argv[0] in ("serve", "check"):
        command, argv = argv[0], argv[1:]
    conf = cfg.load(OPTIONS, prog=f"wallet_svc {command}", argv=argv, env_prefix="AITBC_WALLET_")
    setup_logging("wallet", conf["LOG_LEVEL"])
    if not conf["TREASURY_ADDRESS"]:
        raise SystemExit("TREASURY_ADDRESS is required (--treasury-address)")
    if command == "serve":
        try:
            server_settings(conf)
        except ValueError as exc:
            raise SystemExit(str(exc)) from None
    check_address(conf["TREASURY_ADDRESS"])
    ledger = Ledger(conf["TREASURY_ADDRESS"])
    try:
        # The audit writes nothing: it reads a ledger on a full disk or a
        # read-only file as well as a healthy one.
        store = open_store(conf["DB"], read_only=command == "check")
    except SchemaMismatch as exc:
        raise SystemExit(str(exc)) from None
    if command == "check":
        problems = store.call(ledger.check, snapshot=True)
        minted = store.call(ledger.minted)
        store.close()
        for p in problems:
            print(f"MISMATCH {p}")
        print(
            f"checked ledger {_redact(conf['DB'])}: minted {minted} uait, "
            f"{'clean' if not problems else f'{len(problems)} problem(s)'}"
        )
        return 1 if problems else 0
    try:
        check_public_key(bytes.fromhex(conf["COORDINATOR_PUBLIC_KEY"]))
    except ValueError:
        raise SystemExit("COORDINATOR_PUBLIC_KEY must be a 32-byte hex Ed25519 key") from None
    return asyncio.run(serve(conf, store, ledger))


def _redact(url: str) -> str:
    """Never print a database password."""
    if "://" in url and "@" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


async def serve(conf: dict, store: LedgerStore, ledger: Ledger) -> int:
    deps = WalletDeps(store=store, ledger=ledger, tokens=TokenTable.load(conf["TOKENS_FILE"]))
    service, port = build_server(conf, deps)
    watch_ledger(store, ledger)
    metrics = serve_metrics(conf["METRICS_PORT"], conf["METRICS_HOST"], conf["READY_FILE"])
    await service.start()
    health = asyncio.create_task(follow_health(store, service.set_serving))
    try:
        write_ready_file(conf["READY_FILE"], port)
        log.info("wallet_listening", port=port, db=_redact(conf["DB"]), metrics_port=metrics or None)
        sig = await wait_for_shutdown_signal()
        log.info("wallet_stopping", signal=sig)
    finally:
        health.cancel()
        await service.stop(conf["SHUTDOWN_GRACE"])
        store.close()
    log.info("wallet_stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
