"""python -m miner_svc [run] [flags]: the miner sidecar.
python -m miner_svc doctor [flags]: check this host and say what to fix.
python -m miner_svc status [flags]: the running sidecar's GPUs, jobs, earnings.
python -m miner_svc rotate-key [flags]: a new receipt key, registered under the old one.

Reads the seed guide's env-style config (--config or AITBC_CONFIG, e.g.
/etc/aitbc/miner.conf); the environment and flags override it."""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
from pathlib import Path

import structlog

from aitbc import config as cfg
from aitbc.addresses import address_of, check_address
from aitbc.crypto import KeyPair, load_or_create_key
from aitbc.errors import InvalidArgument
from aitbc.logs import setup_logging
from aitbc.metrics import metrics_options, serve_metrics
from aitbc.server import write_ready_file
from aitbc.tls import TLS_OPTIONS, TlsConfig
from miner_svc._admin import build_admin
from miner_svc._agent import FatalMinerError, MinerAgent, MinerConfig, ensure_dir
from miner_svc._gpu import inventory
from miner_svc._models import local_models
from miner_svc._worker import VRAM_CAP_ENV, Slot, SlotPool

log = structlog.get_logger()

OPTIONS = [
    cfg.Option("COORD_URL", str, "127.0.0.1:50051", "coordinator gRPC address (host:port)", bare_env=True),
    cfg.Option("WALLET_ADDR", str, "", "payout address (default: the address of this miner's key)", bare_env=True),
    cfg.Option("API_KEY", str, "", "miner bearer token issued by the network", bare_env=True),
    cfg.Option("MINER_ID", str, socket.gethostname() + "-gpu0", "stable miner id", bare_env=True),
    cfg.Option("WORK_DIR", Path, Path("/tmp/aitbc-work"), "scratch space and the key file", bare_env=True),
    cfg.Option("HEARTBEAT_SECS", float, 20.0, "fallback heartbeat interval (the coordinator sets it)", bare_env=True),
    cfg.Option("MAX_CONCURRENCY", int, 1, "job slots (one per GPU at most in GPU mode)", bare_env=True),
    cfg.Option("ACCEL_MODE", str, "auto", "auto, gpu or cpu", bare_env=True),
    cfg.Option("KEY_FILE", Path, None, "Ed25519 receipt key (default WORK_DIR/miner.key)", bare_env=True),
    cfg.Option("MAX_RUNTIME_SECS", float, 3600.0, "a job running longer is killed and reported failed", bare_env=True),
    cfg.Option(
        "VRAM_CAP_FRACTION",
        float,
        0.95,
        "a job allocating more than this share of its GPU's memory is killed and reported (0 < x <= 1)",
    ),
    cfg.Option("PREFETCH", int, 1, "assignments taken beyond the slots, their inputs made while jobs run (0..4)"),
    cfg.Option("DRAIN_SECS", float, 60.0, "on SIGTERM, how long running jobs may finish", bare_env=True),
    cfg.Option(
        "MODELS",
        str,
        "",
        "models held, from local folders: workload:name=/path,… (llm_gen, embed, sd_infer)",
        bare_env=True,
    ),
    *TLS_OPTIONS,
    *metrics_options(9102),
    cfg.Option("NETWORK_ID", str, "aitbc-devnet", "network the coordinator serves (for rotate-key)"),
    cfg.Option("ADMIN_PORT", int, 50061, "loopback port of the admin API (GetStatus, Drain); 0 picks one"),
    cfg.Option("READY_FILE", str, "", "written (with the admin port) once connected, for supervisors and tests"),
    cfg.Option("LOG_LEVEL", str, "info", "debug, info, warning or error"),
]


def main(argv: list[str]) -> int:
    command = "run"
    if argv and argv[0] in ("run", "doctor", "status", "rotate-key"):
        command, argv = argv[0], argv[1:]
    conf = cfg.load(OPTIONS, prog=f"miner_svc {command}", argv=argv, env_prefix="AITBC_MINER_")
    setup_logging("miner", conf["LOG_LEVEL"] if command == "run" else "warning")
    if command == "doctor":
        from miner_svc._doctor import doctor

        return doctor(conf)
    if command == "rotate-key":
        from miner_svc._rotate import rotate_key

        return rotate_key(conf)
    if command == "status":
        from miner_svc._status import status

        return status(conf["ADMIN_PORT"], conf["API_KEY"])
    mode = conf["ACCEL_MODE"].lower()
    if mode not in ("auto", "gpu", "cpu"):
        raise SystemExit(f"ACCEL_MODE must be auto, gpu or cpu, not {mode!r}")
    if not conf["API_KEY"]:
        raise SystemExit("API_KEY is required: the miner token the network issued you")
    gpus = inventory() if mode != "cpu" else []
    if mode == "gpu" and not gpus:
        raise SystemExit(
            "ACCEL_MODE=gpu but no GPU is usable: check `nvidia-smi`, the NVIDIA driver, and that "
            "nvidia-ml-py can load libnvidia-ml.so; or set ACCEL_MODE=auto to fall back to CPU"
        )
    device = "cuda" if gpus else "cpu"
    work_dir = ensure_dir(conf["WORK_DIR"])
    key = load_or_create_key(conf["KEY_FILE"] or work_dir / "miner.key")
    payout = conf["WALLET_ADDR"] or address_of(key.public_key)
    try:
        check_address(payout, field="WALLET_ADDR")
    except InvalidArgument as exc:
        raise SystemExit(f"WALLET_ADDR: {exc.message}") from None
    try:
        tls = TlsConfig.from_config(conf)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    if not 0 < conf["VRAM_CAP_FRACTION"] <= 1:
        raise SystemExit(f"VRAM_CAP_FRACTION must be in (0, 1], not {conf['VRAM_CAP_FRACTION']}")
    try:
        models = local_models(conf["MODELS"])
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    slots = max(1, conf["MAX_CONCURRENCY"])
    if gpus:
        slots = min(slots, len(gpus))
    config = MinerConfig(
        coord_url=conf["COORD_URL"],
        api_key=conf["API_KEY"],
        miner_id=conf["MINER_ID"],
        payout_address=payout,
        work_dir=work_dir,
        heartbeat_secs=conf["HEARTBEAT_SECS"],
        slots=slots,
        device=device,
        gpus=tuple(gpus),
        max_runtime=conf["MAX_RUNTIME_SECS"],
        models=models,
        prefetch=max(0, min(4, conf["PREFETCH"])),
        vram_cap_fraction=conf["VRAM_CAP_FRACTION"],
        tls=tls,
    )
    log.info(
        "miner_starting",
        miner_id=config.miner_id,
        device=device,
        slots=slots,
        gpus=len(gpus),
        payout_address=payout,
        public_key=key.public_key.hex(),
    )
    serve_metrics(conf["METRICS_PORT"], conf["METRICS_HOST"], conf["READY_FILE"])
    return asyncio.run(serve(config, key, conf["READY_FILE"], conf["DRAIN_SECS"], conf["ADMIN_PORT"]))


async def serve(config: MinerConfig, key: KeyPair, ready_file: str, drain_secs: float, admin_port: int) -> int:
    if config.device == "cuda":
        # One slot per GPU, each worker seeing only its own.
        cap = {VRAM_CAP_ENV: str(config.vram_cap_fraction)}
        slots = [Slot(i, {"CUDA_VISIBLE_DEVICES": config.gpus[i].uuid, **cap}) for i in range(config.slots)]
    else:
        slots = [Slot(i, {"CUDA_VISIBLE_DEVICES": ""}) for i in range(config.slots)]
    pool = SlotPool(slots)
    pool.warm()
    agent = MinerAgent(config, key, pool)
    agent.recover()
    stop = asyncio.Event()
    terminate = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, terminate.set)

    admin = build_admin(agent, terminate, config.api_key, admin_port)
    await admin.start()
    log.info("admin_listening", port=admin.port)

    async def announce_ready() -> None:
        await agent.on_welcome.wait()
        write_ready_file(ready_file, admin.port)

    async def drain_on_signal() -> None:
        await terminate.wait()
        await agent.drain(drain_secs)
        stop.set()

    ready = asyncio.create_task(announce_ready())
    drainer = asyncio.create_task(drain_on_signal())
    try:
        await agent.run_forever(stop)
    except FatalMinerError as exc:
        log.error("miner_refused", error=str(exc))
        return 2
    finally:
        ready.cancel()
        drainer.cancel()
        await admin.stop(1.0)
        pool.shutdown()
        agent.nvml.close()
    log.info("miner_stopped", earned_uait=agent.earned)
    return 0


def entry() -> None:
    """The `aitbc-miner` console script."""
    sys.exit(main(sys.argv[1:]))


if __name__ == "__main__":
    entry()
