"""The README's walkthrough, as a user runs it: `make run` (aitbc.devnet) in
one terminal, the real grpcurl binary in another."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.grpcurl import GRPCURL, grpcurl, stream_objects

pytestmark = pytest.mark.timeout(180)


def test_readme_walkthrough_with_real_grpcurl(tmp_path: Path) -> None:
    var = tmp_path / "var"
    devnet = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "aitbc.devnet",
            "--var-dir",
            str(var),
            "--coord-port",
            "0",
            "--wallet-port",
            "0",
            "--metrics-port-base",
            "0",
            "--miner-admin-port",
            "0",
            "--log-dir",
            str(tmp_path / "logs"),
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        endpoints = var / "run" / "endpoints.json"
        deadline = time.monotonic() + 90
        while not endpoints.exists():
            assert devnet.poll() is None, devnet.stdout.read() if devnet.stdout else ""
            assert time.monotonic() < deadline, "devnet did not come up"
            time.sleep(0.1)
        ports = json.loads(endpoints.read_text())
        coord, wallet = f"127.0.0.1:{ports['coordinator']}", f"127.0.0.1:{ports['wallet']}"
        env = dict(line.split("=", 1) for line in (var / "dev" / "tokens.env").read_text().split())
        token = env["CLIENT_TOKEN"]

        services = grpcurl(coord, "list").split()
        assert "aitbc.v1.CoordinatorService" in services and "grpc.health.v1.Health" in services
        assert "aitbc.v1.WalletService" in grpcurl(wallet, "list").split()
        assert "rpc SubmitJob" in grpcurl(coord, "describe", "aitbc.v1.CoordinatorService")

        def balance(address: str) -> tuple[int, int]:
            b = json.loads(grpcurl(wallet, "aitbc.v1.WalletService/GetBalance", token=token, data={"address": address}))
            return int(b.get("available", 0)), int(b.get("held", 0))

        client_before = balance(env["CLIENT_ADDRESS"])
        miners = (env["MINER_ADDRESS"], env["MINER1_ADDRESS"])
        miners_before = sum(balance(m)[0] for m in miners)
        assert client_before[0] > 0

        submitted = json.loads(
            grpcurl(
                coord,
                "aitbc.v1.CoordinatorService/SubmitJob",
                token=token,
                data={
                    "request_id": "try-1",
                    "spec": {"matmul": {"n": 256, "dtype": "DTYPE_FP32", "seed": "42"}, "max_price": "100000"},
                },
            )
        )["job"]
        events = stream_objects(
            grpcurl(coord, "aitbc.v1.CoordinatorService/WatchJob", token=token, data={"job_id": submitted["job_id"]})
        )
        states = [e["job"]["state"] for e in events]
        assert states[-1] == "JOB_STATE_SETTLED", states
        final = events[-1]["job"]
        price, paid = int(final["price"]), int(final["miner_amount"])
        assert paid + int(final.get("fee_amount", 0)) == price

        assert balance(env["CLIENT_ADDRESS"]) == (client_before[0] - price, 0)
        assert sum(balance(m)[0] for m in miners) == miners_before + paid
        assert all(balance(m)[1] == 0 for m in miners)

        # A workload verified by redundancy: both devnet miners run it.
        embed = json.loads(
            grpcurl(
                coord,
                "aitbc.v1.CoordinatorService/SubmitJob",
                token=token,
                data={
                    "request_id": "try-2",
                    "spec": {"embed": {"texts": ["a gpu marketplace"]}, "max_price": "1000000"},
                },
            )
        )["job"]
        events = stream_objects(
            grpcurl(coord, "aitbc.v1.CoordinatorService/WatchJob", token=token, data={"job_id": embed["job_id"]})
        )
        final = events[-1]["job"]
        assert final["state"] == "JOB_STATE_SETTLED", final
        assert sorted(r["miner_id"] for r in final["runs"]) == ["devnet-miner-0", "devnet-miner-1"]

        # A bad request comes back as a clear status: grpcurl exits 64 + code.
        assert GRPCURL
        bad = subprocess.run(
            [
                GRPCURL,
                "-plaintext",
                "-H",
                f"authorization: Bearer {token}",
                "-d",
                json.dumps(
                    {"request_id": "bad", "spec": {"matmul": {"n": 0, "dtype": "DTYPE_FP32"}, "max_price": "1"}}
                ),
                coord,
                "aitbc.v1.CoordinatorService/SubmitJob",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert bad.returncode == 64 + 3, bad.stderr  # INVALID_ARGUMENT
        assert "spec.matmul.n" in bad.stderr
    finally:
        # Ctrl-C, as in the terminal: everything stops cleanly.
        devnet.send_signal(signal.SIGINT)
        out, _ = devnet.communicate(timeout=60)
    assert devnet.returncode == 0, out
    assert "stopping" in out
    leftover = subprocess.run(["pgrep", "-f", str(var)], capture_output=True, text=True)
    assert leftover.stdout.strip() == "", "services outlived devnet"
