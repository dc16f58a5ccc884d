"""aitbc-miner (python -m miner_svc): the miner sidecar and its tools.

Reads the seed guide's env-style config (--config or AITBC_CONFIG, e.g.
/etc/aitbc/miner.conf); the environment and flags override it."""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import structlog

from aitbc import config as cfg
from aitbc.addresses import address_of
from aitbc.config import config_error
from aitbc.crypto import KeyPair
from aitbc.logs import setup_logging
from aitbc.metrics import metrics_options, serve_metrics
from aitbc.server import write_ready_file
from aitbc.tls import TLS_OPTIONS
from miner_svc import _settings, _systemd
from miner_svc._admin import build_admin
from miner_svc._agent import FatalMinerError, MinerAgent, MinerConfig
from miner_svc._gpu import inventory
from miner_svc._models import local_models
from miner_svc._state import DEFAULT_STATE_DIR, Layout, StateError, load_key, prepare
from miner_svc._worker import VRAM_CAP_ENV, Slot, SlotPool

log = structlog.get_logger()

COMMANDS = {
    "run": "connect to the coordinator and run the jobs it pushes (the default)",
    "doctor": "check this host and its config against the coordinator; say what to fix (exit 1 on any FAIL)",
    "status": "what the running sidecar is doing: GPUs, jobs, earnings (its loopback admin API)",
    "rotate-key": "replace the receipt key, registered under the old one's signature (stop the sidecar first)",
    "show-key": "print this miner's public key and payout address (what the operator needs after a lost key)",
}
HELP = (
    "commands:\n"
    + "".join(f"  {name:<11} {doc}\n" for name, doc in COMMANDS.items())
    + "\nEvery command takes the options above. `run` exits 0 when stopped, 77 when the coordinator\n"
    "refuses its token or key, 78 on a configuration error: the unit does not restart on 77 or 78.\n"
)

OPTIONS = [
    cfg.Option("COORD_URL", str, "127.0.0.1:50051",
               "coordinator: https://host[:port] (TLS, 443 by default), http://host:port or host:port",
               bare_env=True),
    cfg.Option("WALLET_ADDR", str, "", "payout address (default: the address of this miner's key)", bare_env=True),
    cfg.Option("API_KEY", str, "", "miner bearer token issued by the network", bare_env=True),
    cfg.Option("MINER_ID", str, socket.gethostname() + "-gpu0", "stable miner id", bare_env=True),
    cfg.Option("STATE_DIR", Path, DEFAULT_STATE_DIR,
               "what must survive restarts: miner.key, results awaiting delivery (back it up)"),
    cfg.Option("WORK_DIR", str, "", "scratch space for running jobs (default STATE_DIR/work)", bare_env=True),
    cfg.Option("KEY_FILE", Path, None, "Ed25519 receipt key (default STATE_DIR/miner.key)", bare_env=True),
    cfg.Option("ALLOW_TMP_STATE", cfg.parse_bool, False,
               "let STATE_DIR or KEY_FILE lie under /tmp (a throwaway test network only)"),
    cfg.Option("ALLOW_PLAINTEXT", cfg.parse_bool, False,
               "send the token without TLS to a coordinator that is not on this host"),
    cfg.Option("HEARTBEAT_SECS", float, 20.0, "fallback heartbeat interval (the coordinator sets it)", bare_env=True),
    cfg.Option("JOB_POLL_SECS", float, None, "the seed's poll interval: accepted, unused (jobs are pushed)",
               bare_env=True),
    cfg.Option("MAX_CONCURRENCY", int, 1, "job slots (one per GPU at most in GPU mode)", bare_env=True),
    cfg.Option("ACCEL_MODE", str, "auto",
               "auto, gpu (CPU with a warning when no GPU works), cpu, or gpu-only (exit 78 without a GPU)",
               bare_env=True),
    cfg.Option("MAX_RUNTIME_SECS", float, 3600.0, "a job running longer is killed and reported failed", bare_env=True),
    cfg.Option(
        "VRAM_CAP_FRACTION",
        float,
        0.95,
        "a job allocating more than this share of its GPU's memory is killed and reported (0 < x <= 1)",
    ),
    cfg.Option("PREFETCH", int, 1, "assignments taken beyond the slots, their inputs made while jobs run (0..4)"),
    cfg.Option("DRAIN_SECS", float, 60.0,
               "on SIGTERM, how long running jobs may finish (systemd is told to wait this + 30 s)", bare_env=True),
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
]  # fmt: skip


def main(argv: list[str]) -> int:
    command = "run"
    if argv and argv[0] in COMMANDS:
        command, argv = argv[0], argv[1:]
    unknown: list[str] = []
    conf = cfg.load(
        OPTIONS,
        prog="aitbc-miner" if command == "run" else f"aitbc-miner {command}",
        argv=argv,
        env_prefix="AITBC_MINER_",
        epilog=HELP,
        on_unknown=lambda path, keys: unknown.extend(f"{k} (in {path})" for k in keys),
    )
    setup_logging("miner", conf["LOG_LEVEL"] if command == "run" else "warning")
    if command == "doctor":
        from miner_svc._doctor import doctor

        return doctor(conf, unknown_keys=unknown)
    if command == "rotate-key":
        from miner_svc._rotate import rotate_key

        return rotate_key(conf)
    if command == "status":
        from miner_svc._status import status

        return status(conf["ADMIN_PORT"], conf["API_KEY"])
    if command == "show-key":
        return show_key(conf)
    for key in unknown:
        log.warning("config_key_unknown", key=key, effect="ignored: check its spelling (aitbc-miner --help)")
    return run(conf)


def show_key(conf: dict[str, Any]) -> int:
    layout = Layout.from_config(conf)
    if not layout.key_file.exists():
        print(f"no key at {layout.key_file} yet: the sidecar makes one on its first start")
        return 1
    try:
        key = load_key(layout)
    except StateError as exc:
        print(exc)
        return 1
    print(f"miner_id    {conf['MINER_ID']}")
    print(f"public_key  {key.public_key.hex()}")
    print(f"address     {address_of(key.public_key)}")
    print(f"key_file    {layout.key_file}")
    print(f"payouts     {conf['WALLET_ADDR'] or address_of(key.public_key)}")
    return 0


def run(conf: dict[str, Any]) -> int:
    problems = _settings.problems(conf)
    if problems:
        config_error("\n".join(f"aitbc-miner: {p}" for p in problems))
    endpoint, tls = _settings.link(conf)
    if conf["JOB_POLL_SECS"] is not None:
        log.info("job_poll_secs_unused", value=conf["JOB_POLL_SECS"],
                 why="the coordinator pushes jobs down the open stream; nothing polls")  # fmt: skip
    mode = conf["ACCEL_MODE"].lower()
    gpus = inventory() if mode != "cpu" else []
    if not gpus and mode == "gpu-only":
        config_error(f"aitbc-miner: {_settings.GPU_ONLY_PROBLEM}")
    if not gpus and mode == "gpu":
        log.warning(
            "no_gpu_running_on_cpu",
            fix="check `nvidia-smi` and the NVIDIA driver; ACCEL_MODE=gpu-only refuses to start without a GPU",
        )
    device = "cuda" if gpus else "cpu"
    try:
        models = local_models(conf["MODELS"])
    except ValueError as exc:
        config_error(f"aitbc-miner: {exc}")
    layout = Layout.from_config(conf)
    try:
        prepare(layout, allow_temp=conf["ALLOW_TMP_STATE"])
        key = load_key(layout)
    except StateError as exc:
        config_error(f"aitbc-miner: {exc}")
    payout = conf["WALLET_ADDR"] or address_of(key.public_key)
    if not conf["WALLET_ADDR"]:
        log.warning(
            "payouts_to_miner_key",
            payout_address=payout,
            key_file=str(layout.key_file),
            advice=f"no WALLET_ADDR: earnings go to this key's address, spendable only with {layout.key_file}. "
            "Back that file up now (and after rotate-key), or set WALLET_ADDR to your wallet's address",
        )
    slots = max(1, conf["MAX_CONCURRENCY"])
    if gpus:
        slots = min(slots, len(gpus))
    config = MinerConfig(
        coord_url=str(endpoint),
        api_key=conf["API_KEY"],
        miner_id=conf["MINER_ID"],
        payout_address=payout,
        work_dir=layout.work_dir,
        state_dir=layout.state_dir,
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
        coordinator=config.coord_url,
        tls=_settings.channel_kind(endpoint, tls),
        device=device,
        slots=slots,
        gpus=len(gpus),
        payout_address=payout,
        public_key=key.public_key.hex(),
        state_dir=str(layout.state_dir),
        work_dir=str(layout.work_dir),
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
        _systemd.stopping(drain_secs)
        await agent.drain(drain_secs)
        stop.set()

    ready = asyncio.create_task(announce_ready())
    drainer = asyncio.create_task(drain_on_signal())
    try:
        await agent.run_forever(stop)
    except FatalMinerError as exc:
        log.error("miner_refused", error=str(exc), fix=exc.fix, exit_status=exc.exit_status)
        sys.stderr.write(f"aitbc-miner: {exc}\n  fix: {exc.fix}\n")
        return exc.exit_status
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
