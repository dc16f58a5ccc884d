"""python -m coordinator_svc [flags]: serve the coordinator."""

from __future__ import annotations

import asyncio
import sys

import structlog

from aitbc import config as cfg
from aitbc.auth import TokenTable
from aitbc.crypto import load_or_create_key
from aitbc.dbfaults import follow_health
from aitbc.errors import AitbcError
from aitbc.logs import setup_logging
from aitbc.metrics import serve_metrics
from aitbc.server import server_settings, wait_for_shutdown_signal, write_ready_file
from aitbc.sqlite import SchemaMismatch
from aitbc.tls import TlsConfig
from aitbc.workloads import embed
from coordinator_svc._jobs import Coordinator, Settings, parse_prices
from coordinator_svc._metrics import watch_sidecar_versions, watch_store
from coordinator_svc._store import open_job_store
from coordinator_svc._wallet import WalletClient
from coordinator_svc.server import OPTIONS, CoordinatorDeps, build_server

log = structlog.get_logger()


def main(argv: list[str]) -> int:
    conf = cfg.load(OPTIONS, prog="coordinator_svc", argv=argv, env_prefix="AITBC_COORD_")
    setup_logging("coordinator", conf["LOG_LEVEL"])
    if not conf["WALLET_TOKEN"]:
        raise SystemExit("WALLET_TOKEN is required (env AITBC_COORD_WALLET_TOKEN)")
    try:
        server_settings(conf)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    return asyncio.run(serve(conf))


async def serve(conf: dict) -> int:
    try:
        prices = parse_prices(conf["PRICES"])
        embed.register_models(embed.parse_models(conf["EMBED_MODELS"]))
    except (ValueError, AitbcError) as exc:
        raise SystemExit(str(exc)) from None
    if conf["CHECK_MEMORY_BYTES"] < 2**20 or conf["CHECK_THREADS"] < 1:
        raise SystemExit("CHECK_MEMORY_BYTES must be at least 1 MiB and CHECK_THREADS at least 1")
    result_days, job_days = conf["RESULT_RETENTION_DAYS"], conf["JOB_RETENTION_DAYS"]
    if min(result_days, job_days, conf["RECONNECT_GRACE_SECS"]) < 0 or conf["RETENTION_SWEEP_SECS"] <= 0:
        raise SystemExit("retention days and RECONNECT_GRACE_SECS must not be negative, RETENTION_SWEEP_SECS positive")
    if job_days and result_days and job_days < result_days:
        raise SystemExit("JOB_RETENTION_DAYS must be 0 or at least RESULT_RETENTION_DAYS (a row outlives its result)")
    settings = Settings(
        network_id=conf["NETWORK_ID"],
        heartbeat_secs=conf["HEARTBEAT_SECS"],
        lease_secs=conf["LEASE_SECS"],
        reconnect_grace_secs=conf["RECONNECT_GRACE_SECS"],
        result_retention_days=conf["RESULT_RETENTION_DAYS"],
        job_retention_days=conf["JOB_RETENTION_DAYS"],
        retention_sweep_secs=conf["RETENTION_SWEEP_SECS"],
        max_attempts=conf["MAX_ATTEMPTS"],
        fee_bps=conf["FEE_BPS"],
        ban_after=conf["BAN_AFTER"],
        run_bound_factor=conf["RUN_BOUND_FACTOR"],
        run_bound_floor_secs=conf["RUN_BOUND_FLOOR_SECS"],
        max_result_bytes=conf["MAX_RESULT_BYTES"],
        check_memory_bytes=conf["CHECK_MEMORY_BYTES"],
        check_threads=conf["CHECK_THREADS"],
        referee_wait_secs=conf["REFEREE_WAIT_SECS"],
        prices=prices,
    )
    try:
        store = open_job_store(conf["DB"])
    except SchemaMismatch as exc:
        raise SystemExit(str(exc)) from None
    wallet = WalletClient(conf["WALLET_TARGET"], conf["WALLET_TOKEN"], TlsConfig.from_config(conf))
    tokens = TokenTable.load(conf["TOKENS_FILE"])
    core = Coordinator(
        store=store,
        miner_token_live=tokens.speaks_for_miner,
        wallet=wallet,
        key=load_or_create_key(conf["KEY_FILE"]),
        settings=settings,
        blobs_dir=conf["BLOBS_DIR"],
    )
    service, port = build_server(conf, CoordinatorDeps(core=core, tokens=tokens))
    watch_store(store)
    watch_sidecar_versions(lambda: [s.version for s in list(core.sessions.values())])
    metrics = serve_metrics(conf["METRICS_PORT"], conf["METRICS_HOST"], conf["READY_FILE"])
    await service.start()
    health = asyncio.create_task(follow_health(store, service.set_serving))
    try:
        await core.start()
        write_ready_file(conf["READY_FILE"], port)
        log.info("coordinator_listening", port=port, network_id=settings.network_id, metrics_port=metrics or None)
        sig = await wait_for_shutdown_signal()
        log.info("coordinator_stopping", signal=sig)
    finally:
        health.cancel()
        core.disconnect_all()
        await service.stop(conf["SHUTDOWN_GRACE"])
        await core.stop()
        await wallet.close()
        store.close()
    log.info("coordinator_stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
