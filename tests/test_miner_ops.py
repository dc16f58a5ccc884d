"""What a GPU owner installs and runs: config, service unit, doctor."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from aitbc.config import parse_env_file
from aitbc.crypto import KEY_ROTATION_DOMAIN, KeyPair
from aitbc.localnet import ROOT, Network
from aitbc.rpc import error_reason
from aitbc.signed import seal
from aitbc.timeutil import ts_now
from aitbc.v1 import coordinator_pb2 as cpb
from aitbc.v1 import coordinator_pb2_grpc, miner_pb2, miner_pb2_grpc, signing_pb2
from miner_svc.__main__ import OPTIONS
from miner_svc._gpu import inventory
from miner_svc._state import under_temp
from tests.test_coordinator import long_spec, running_on
from tests.test_e2e import Clients, matmul_spec

DEPLOY = ROOT / "deploy"
# Kept, not replaced: on a GPU image the carried wheels are on it.
PYTHONPATH = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))


def test_example_config_uses_only_declared_options() -> None:
    values = parse_env_file(DEPLOY / "miner.conf.example")
    declared = {o.key for o in OPTIONS}
    assert set(values) <= declared, set(values) - declared
    # The seed's keys are all there, and $(hostname) works as in the seed.
    seed_keys = {"COORD_URL", "WALLET_ADDR", "API_KEY", "MINER_ID", "WORK_DIR", "HEARTBEAT_SECS",
                 "MAX_CONCURRENCY", "ACCEL_MODE"}  # fmt: skip
    assert seed_keys <= set(values)
    assert values["MINER_ID"] == f"{socket.gethostname()}-gpu0"


def test_service_unit_is_hardened_and_drains() -> None:
    unit = (DEPLOY / "aitbc-miner.service").read_text()
    for directive in (
        "User=aitbc",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "Restart=always",
        "KillSignal=SIGTERM",
        "StateDirectory=aitbc",
        "StateDirectoryMode=0700",
        "RestartPreventExitStatus=77 78",
    ):
        assert directive in unit.splitlines(), directive
    assert "miner_svc run --config /etc/aitbc/miner.conf" in unit
    assert subprocess.run(["bash", "-n", str(DEPLOY / "install_miner.sh")]).returncode == 0


def doctor(*flags: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "miner_svc", "doctor", *flags],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": PYTHONPATH, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_doctor_passes_on_a_cpu_host_with_a_live_coordinator(network: Network, tmp_path: Path) -> None:
    network.start_wallet()
    network.start_coordinator()
    miner = network.ids["miner"]
    out = doctor("--coord-url", network.coord_target, "--state-dir", str(tmp_path / "s"), "--allow-tmp-state", "true",
                 "--miner-id", "miner-1", "--wallet-addr", miner.address, "--admin-port", "0",
                 env={"AITBC_MINER_API_KEY": miner.token})  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    if inventory():
        assert "OK   GPU 0: " in out.stdout and "OK   torch sees " in out.stdout
    else:
        assert "WARN no GPU through NVML: jobs will run on the CPU" in out.stdout
    assert f"OK   coordinator {network.coord_target} serves miners" in out.stdout
    assert "OK   the coordinator accepts API_KEY as a miner token for miner-1" in out.stdout
    assert out.stdout.strip().endswith("all checks passed")


def test_doctor_says_what_to_fix(tmp_path: Path) -> None:
    state = tmp_path / "s"
    state.mkdir()
    key = state / "miner.key"
    key.write_text("00" * 32 + "\n")
    key.chmod(0o644)
    out = doctor("--coord-url", "127.0.0.1:1", "--state-dir", str(state), "--wallet-addr", "ait_typo",
                 "--accel-mode", "gpu-only", "--models", f"llm_gen:big={state}/nowhere", "--tls-ca", "/no/ca.pem",
                 env={"AITBC_MINER_API_KEY": ""})  # fmt: skip
    assert out.returncode == 1
    for expected in (
        "FAIL API_KEY is empty",
        "FAIL WALLET_ADDR='ait_typo' is not an AIT address (address checksum does not match: check for a typo)",
        "fix: expected ait_ followed by 39 lowercase letters and digits",
        f"FAIL STATE_DIR {state} is under {under_temp(state)}",
        f"fix: chmod 600 {key}",
        *([] if inventory() else ["FAIL ACCEL_MODE=gpu-only but NVML sees no GPU"]),
        f"FAIL MODELS entry 'llm_gen:big={state}/nowhere': {state}/nowhere is not a model folder",
        "FAIL TLS: /no/ca.pem does not exist",
    ):
        assert expected in out.stdout, (expected, out.stdout)
    unreachable = doctor("--coord-url", "127.0.0.1:1", "--state-dir", str(state), env={"AITBC_MINER_API_KEY": "x1"})
    assert "FAIL coordinator 127.0.0.1:1 does not answer" in unreachable.stdout, unreachable.stdout


async def test_status_shows_the_running_job_and_drain_stops_the_sidecar(network: Network) -> None:
    network.start_wallet()
    network.start_coordinator("--heartbeat-secs", "0.5")
    network.start_miner("miner")
    admin_port = network.ports["miner"]
    clients = Clients(network)
    try:
        await clients.mint("client", 100_000_000)
        job = await clients.submit(long_spec())
        await running_on(clients, job.job_id, "miner-1")
        token = network.ids["miner"].token
        out = await asyncio.to_thread(doctor_like, "status", "--admin-port", str(admin_port), token=token)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "miner       miner-1  (cpu, 1 slot)" in out.stdout
        assert "connected" in out.stdout and "gpus        none (CPU mode)" in out.stdout
        assert f"job         {job.job_id}  running" in out.stdout
        assert "reputation  no verdict yet" in out.stdout
        assert "models      embed/all-minilm-l6-v2" in out.stdout  # the packaged MiniLM, always offered
        wrong = await asyncio.to_thread(doctor_like, "status", "--admin-port", str(admin_port), token="not-it")
        assert wrong.returncode == 1 and "UNAUTHENTICATED" in wrong.stdout
        async with grpc.aio.insecure_channel(f"127.0.0.1:{admin_port}") as ch:
            drained = await miner_pb2_grpc.MinerAdminServiceStub(ch).Drain(
                miner_pb2.DrainRequest(), metadata=(("authorization", f"Bearer {token}"),)
            )
        assert drained.running == 1
        assert await asyncio.to_thread(network.procs["miner"].wait, 60) == 0
        final = (await clients.watch(job.job_id))[-1]
        assert final.state == cpb.JOB_STATE_SETTLED
    finally:
        await clients.close()


def doctor_like(*args: str, token: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "miner_svc", *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": PYTHONPATH, "AITBC_MINER_API_KEY": token},
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_rotate_key_registers_the_new_key_under_the_old_one(network: Network) -> None:
    network.start_wallet()
    network.start_coordinator()
    network.start_miner("miner")
    clients = Clients(network)
    token = network.ids["miner"].token
    key_file = network.root / "miner" / "miner.key"
    rotate = ["rotate-key", "--coord-url", network.coord_target, "--miner-id", "miner-1",
              "--state-dir", str(network.root / "miner")]  # fmt: skip
    try:
        await clients.mint("client", 1_000_000)
        first = (await clients.watch((await clients.submit(matmul_spec(n=16))).job_id))[-1]
        old_key = first.receipt.public_key
        busy = await asyncio.to_thread(doctor_like, *rotate, "--admin-port", str(network.ports["miner"]), token=token)
        assert busy.returncode == 1 and "stop it first" in busy.stdout
        network.stop("miner")
        out = await asyncio.to_thread(doctor_like, *rotate, token=token)
        assert out.returncode == 0, out.stdout + out.stderr
        assert key_file.read_text() != "" and list(key_file.parent.glob("miner.key.old-*"))
        network.start_miner("miner")
        second = (await clients.watch((await clients.submit(matmul_spec(n=16))).job_id))[-1]
        assert second.state == cpb.JOB_STATE_SETTLED
        assert second.receipt.public_key != old_key
        assert second.receipt.public_key.hex() in out.stdout

        # A rotation not signed by the current key changes nothing.
        impostor, fresh = KeyPair.generate(), KeyPair.generate()
        body = signing_pb2.KeyRotationBody(
            network_id="aitbc-devnet", miner_id="miner-1", new_public_key=fresh.public_key, create_time=ts_now(),
            nonce=b"0123456789abcdef",
        )  # fmt: skip
        signed = seal(body, KEY_ROTATION_DOMAIN, impostor)
        async with grpc.aio.insecure_channel(network.coord_target) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await coordinator_pb2_grpc.MinerGatewayServiceStub(ch).RotateKey(
                    cpb.RotateKeyRequest(
                        rotation=signed, new_key_signature=fresh.sign(KEY_ROTATION_DOMAIN, signed.body)
                    ),
                    metadata=(("authorization", f"Bearer {token}"),),
                )
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert error_reason(err.value) == "KEY_MISMATCH"
    finally:
        await clients.close()
