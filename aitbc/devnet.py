"""`make run`: a whole network on this machine — wallet, coordinator and two
miner sidecars (two, so jobs verified by redundancy can complete) — with
SQLite stores under var/.

On first start it makes dev keys and bearer tokens (var/dev/) and builds
tiny demo models (var/models/: a GPT-2 for llm_gen, a Stable Diffusion
pipeline for sd_infer; embed uses the packaged MiniLM), and on every start
it makes sure the dev client holds its faucet funds (an idempotent Mint).
Prints the grpcurl commands to try. Ctrl-C stops everything cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

from aitbc.addresses import address_of
from aitbc.auth import Principal, TokenTable, auth_metadata, new_token
from aitbc.crypto import load_or_create_key
from aitbc.rpc import insecure_channel
from aitbc.v1 import wallet_pb2, wallet_pb2_grpc

FAUCET_UAIT = 1_000 * 1_000_000  # 1,000 AIT
MINER_IDS = ("devnet-miner-0", "devnet-miner-1")


def _write_secret(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def bootstrap(var: Path) -> dict[str, str]:
    """Make (once) the dev keys, tokens and principals; return the facts."""
    dev = var / "dev"
    dev.mkdir(parents=True, exist_ok=True)
    facts_path = dev / "devnet.json"
    if facts_path.exists():
        return dict(json.loads(facts_path.read_text()))
    coordinator = load_or_create_key(dev / "coordinator.key")
    treasury = load_or_create_key(dev / "treasury.key")
    client = load_or_create_key(dev / "client.key")
    facts = {
        "coordinator_public_key": coordinator.public_key.hex(),
        "treasury_address": address_of(treasury.public_key),
        "client_address": address_of(client.public_key),
        "admin_token": new_token(),
        "coordinator_token": new_token(),
        "client_token": new_token(),
    }
    for i, miner_id in enumerate(MINER_IDS):
        suffix = str(i) if i else ""
        key = load_or_create_key(var / f"miner{suffix}" / "miner.key")
        facts[f"miner{suffix}_address"] = address_of(key.public_key)
        facts[f"miner{suffix}_id"] = miner_id
        facts[f"miner{suffix}_token"] = new_token()
    TokenTable.dump(
        dev / "principals.json",
        [
            (facts["admin_token"], Principal("dev-admin", "admin")),
            (facts["coordinator_token"], Principal("coordinator", "coordinator")),
            (facts["client_token"], Principal("dev-client", "client", address=facts["client_address"])),
            *(
                (facts[f"{m}_token"], Principal(facts[f"{m}_id"], "miner", address=facts[f"{m}_address"],
                                                miner_id=facts[f"{m}_id"]))
                for m in ("miner", "miner1")
            ),
        ],
    )  # fmt: skip
    _write_secret(
        dev / "tokens.env",
        "".join(
            f"{k.upper()}={facts[k]}\n"
            for k in ("admin_token", "client_token", "miner_token", "miner1_token", "coordinator_token")
        )
        + f"CLIENT_ADDRESS={facts['client_address']}\nMINER_ADDRESS={facts['miner_address']}\n"
        + f"MINER1_ADDRESS={facts['miner1_address']}\n"
        + f"COORDINATOR_PUBLIC_KEY={facts['coordinator_public_key']}\n"
        # The aitbc CLI then acts as the dev client: its key and its token.
        + f"AITBC_KEY_FILE={dev / 'client.key'}\nAITBC_TOKEN={facts['client_token']}\n",
    )
    _write_secret(facts_path, json.dumps(facts, indent=2) + "\n")
    return facts


class NotReady(RuntimeError):
    pass


def wait_ready(
    path: Path, proc: subprocess.Popen[bytes], name: str, timeout: float = 60.0, log: Path | None = None
) -> int:
    """Wait for a service's ready file; return the port it holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text()[-4000:] if log and log.exists() else ""
            raise NotReady(f"{name} exited with code {proc.returncode} before it was ready\n{tail}")
        if path.exists():
            return int(path.read_text().strip() or 0)
        time.sleep(0.05)
    raise NotReady(f"{name} was not ready after {timeout:.0f}s")


async def _fund(target: str, token: str, address: str) -> int:
    async with insecure_channel(target) as channel:
        stub = wallet_pb2_grpc.WalletServiceStub(channel)
        resp = await stub.Mint(
            wallet_pb2.MintRequest(address=address, amount=FAUCET_UAIT, request_id="devnet-faucet-client"),
            metadata=auth_metadata(token),
            timeout=10,
        )
        return int(resp.balance.available)


def demo_models(folder: Path) -> str:
    """Build the tiny demo models once; return the miners' MODELS option."""
    from aitbc.tinymodels import build_tiny_gpt2, build_tiny_sd

    if not (folder / "tiny-sd" / "model_index.json").exists():
        print("devnet: building tiny demo models in var/models (once)...", file=sys.stderr, flush=True)
    gpt2, sd = build_tiny_gpt2(folder / "tiny-gpt2"), build_tiny_sd(folder / "tiny-sd")
    return f"llm_gen:tiny-gpt2={gpt2},sd_infer:tiny-sd={sd}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="aitbc.devnet", description=__doc__)
    ap.add_argument("--var-dir", type=Path, default=Path("var"))
    ap.add_argument("--coord-port", type=int, default=int(os.environ.get("AITBC_DEVNET_COORD_PORT", 50051)))
    ap.add_argument("--wallet-port", type=int, default=int(os.environ.get("AITBC_DEVNET_WALLET_PORT", 50052)))
    ap.add_argument("--miner-admin-port", type=int, default=50061)
    ap.add_argument(
        "--metrics-port-base", type=int, default=9100,
        help="Prometheus endpoints: coordinator at this port, wallet +1, miners +2 and +3 (0: free ports)",
    )  # fmt: skip
    ap.add_argument("--log-dir", type=Path, help="write each service's log to a file here")
    ap.add_argument("--lease-secs", type=float, default=30.0)
    args = ap.parse_args(argv)
    var: Path = args.var_dir.resolve()
    facts = bootstrap(var)
    run = var / "run"
    run.mkdir(parents=True, exist_ok=True)
    for f in run.glob("*.port"):
        f.unlink()
    procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def metrics_port(offset: int) -> int:
        return args.metrics_port_base + offset if args.metrics_port_base else 0

    logs: list[IO[bytes]] = []

    def start(name: str, module: str, flags: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        out: IO[bytes] | None = None
        if args.log_dir:
            args.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(args.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - closed at shutdown
            logs.append(out)
        proc = subprocess.Popen(
            [sys.executable, "-m", module, *flags],
            env={**os.environ, **env},
            stdout=out,
            stderr=out,
            # Own process group: Ctrl-C reaches devnet, which stops the
            # services in order instead of all at once.
            start_new_session=True,
        )
        procs.append((name, proc))
        return proc

    def stop_all() -> None:
        for name, proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    print(f"devnet: {name} did not stop in 15s; killing it", file=sys.stderr)
                    proc.kill()
                    proc.wait()
        for f in logs:
            f.close()

    interrupted = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal interrupted
        interrupted = True
        raise KeyboardInterrupt

    # Installed explicitly: a shell that starts us in the background leaves
    # SIGINT ignored, and Python then would not raise KeyboardInterrupt.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        wallet = start(
            "wallet",
            "wallet_svc",
            [
                "--port",
                str(args.wallet_port),
                "--db",
                str(var / "wallet.sqlite"),
                "--tokens-file",
                str(var / "dev/principals.json"),
                "--coordinator-public-key",
                facts["coordinator_public_key"],
                "--treasury-address",
                facts["treasury_address"],
                "--ready-file",
                str(run / "wallet.port"),
                "--metrics-port",
                str(metrics_port(1)),
            ],
            {},
        )
        wallet_port = wait_ready(run / "wallet.port", wallet, "wallet")
        balance = asyncio.run(_fund(f"127.0.0.1:{wallet_port}", facts["admin_token"], facts["client_address"]))
        coord = start(
            "coordinator",
            "coordinator_svc",
            [
                "--port",
                str(args.coord_port),
                "--db",
                str(var / "coordinator.sqlite"),
                "--blobs-dir",
                str(var / "blobs"),
                "--tokens-file",
                str(var / "dev/principals.json"),
                "--key-file",
                str(var / "dev/coordinator.key"),
                "--wallet-target",
                f"127.0.0.1:{wallet_port}",
                "--lease-secs",
                str(args.lease_secs),
                "--ready-file",
                str(run / "coordinator.port"),
                "--metrics-port",
                str(metrics_port(0)),
            ],
            {"AITBC_COORD_WALLET_TOKEN": facts["coordinator_token"]},
        )
        coord_port = wait_ready(run / "coordinator.port", coord, "coordinator")
        models = demo_models(var / "models")
        for m in ("miner", "miner1"):
            admin_port = args.miner_admin_port + (1 if m == "miner1" and args.miner_admin_port else 0)
            miner = start(
                m,
                "miner_svc",
                [
                    "--coord-url", f"127.0.0.1:{coord_port}",
                    "--miner-id", facts[f"{m}_id"],
                    "--state-dir", str(var / m),
                    # A dev network: its key may go with var/, wherever that is.
                    "--allow-tmp-state", "true",
                    "--wallet-addr", facts[f"{m}_address"],
                    "--admin-port", str(admin_port),
                    "--models", models,
                    "--ready-file", str(run / f"{m}.ready"),
                    "--metrics-port", str(metrics_port(2 if m == "miner" else 3)),
                ],
                {"AITBC_MINER_API_KEY": facts[f"{m}_token"]},
            )  # fmt: skip
            wait_ready(run / f"{m}.ready", miner, m)
        metrics = {
            name: int((run / f"{name}.{'port' if name in ('wallet', 'coordinator') else 'ready'}.metrics")
                      .read_text())
            for name in ("coordinator", "wallet", "miner", "miner1")
        }  # fmt: skip
        (run / "endpoints.json").write_text(
            json.dumps({"coordinator": coord_port, "wallet": wallet_port, "metrics": metrics}) + "\n"
        )
        print(_banner(facts, coord_port, wallet_port, balance, var, metrics), flush=True)
        while True:
            for name, proc in procs:
                if proc.poll() is not None:
                    print(f"devnet: {name} exited with code {proc.returncode}; stopping the rest", file=sys.stderr)
                    return 1
            time.sleep(0.5)
    except NotReady as exc:
        print(f"devnet: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ndevnet: stopping miners, coordinator, wallet...", file=sys.stderr, flush=True)
        return 0
    finally:
        # A second Ctrl-C must not cut the orderly stop short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stop_all()


def _banner(facts: dict[str, str], coord: int, wallet: int, balance: int, var: Path, metrics: dict[str, int]) -> str:
    c, w = f"127.0.0.1:{coord}", f"127.0.0.1:{wallet}"
    scrape = "  ".join(f"{name} http://127.0.0.1:{port}/metrics" for name, port in metrics.items())
    return f"""
AITBC devnet is up.  coordinator {c}   wallet {w}   miners {facts["miner_id"]}, {facts["miner1_id"]}
Dev client {facts["client_address"]} holds {balance / 1e6:,.2f} AIT. Tokens: {var}/dev/tokens.env

Try, in another terminal (grpcurl ships in .venv/bin):

  source {var}/dev/tokens.env; export PATH=$PWD/.venv/bin:$PATH
  grpcurl -plaintext {c} list
  grpcurl -plaintext -H "authorization: Bearer $CLIENT_TOKEN" -d '{{"request_id": "try-1",
      "spec": {{"matmul": {{"n": 256, "dtype": "DTYPE_FP32", "seed": "42"}}, "max_price": "100000"}}}}' \\
    {c} aitbc.v1.CoordinatorService/SubmitJob
  grpcurl -plaintext -H "authorization: Bearer $CLIENT_TOKEN" -d '{{"job_id":"<job_id from above>"}}' \\
    {c} aitbc.v1.CoordinatorService/WatchJob
  grpcurl -plaintext -H "authorization: Bearer $CLIENT_TOKEN" -d "{{\\"address\\":\\"$CLIENT_ADDRESS\\"}}" \\
    {w} aitbc.v1.WalletService/GetBalance
  grpcurl -plaintext -H "authorization: Bearer $CLIENT_TOKEN" -d "{{\\"address\\":\\"$MINER_ADDRESS\\"}}" \\
    {w} aitbc.v1.WalletService/GetBalance

The other workloads (verified by two miners agreeing), same SubmitJob call, with "spec" one of:
  {{"llm_gen": {{"model": "tiny-gpt2", "prompt": "hello", "max_new_tokens": 16}}, "max_price": "1000000"}}
  {{"embed": {{"texts": ["a gpu marketplace", "verified work"]}}, "max_price": "1000000"}}
  {{"sd_infer": {{"model": "tiny-sd", "prompt": "a red fox", "width": 64, "height": 64, "steps": 4}},
   "max_price": "1000000"}}
Fetch a result: -d '{{"job_id":"..."}}' {c} aitbc.v1.CoordinatorService/GetJobResult

Or with the command-line client, as the dev client:
  set -a; source {var}/dev/tokens.env; set +a; export AITBC_COORDINATOR={c} AITBC_WALLET={w}
  aitbc balance; aitbc submit matmul --n 512
  aitbc jobs; aitbc result JOB_ID -o out.bin; aitbc verify-receipt out.bin.job --output out.bin

Prometheus metrics: {scrape}
(deploy/prometheus.yml scrapes them; deploy/grafana-dashboard.json shows them)

The miner's own view (GPUs, jobs, earnings):
  AITBC_MINER_API_KEY=$MINER_TOKEN python -m miner_svc status

Ctrl-C stops them all.
"""


if __name__ == "__main__":
    sys.exit(main())
