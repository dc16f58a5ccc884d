"""The `aitbc` command as a user drives it against running services: make a
key, get a token for its address and funds from the dev faucet, submit each
workload and follow it to SETTLED, list jobs, fetch a result, check its
receipt and settlement offline — with the exit codes a script relies on."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from aitbc.addresses import address_of
from aitbc.crypto import KeyPair
from aitbc.localnet import Network, make_network
from aitbc.v1 import coordinator_pb2 as cpb
from tests.conftest import ROOT

pytestmark = pytest.mark.timeout(300)
AITBC = str(Path(sys.executable).parent / "aitbc")


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory, tiny_models: str) -> Iterator[Network]:
    n = make_network(tmp_path_factory.mktemp("cli"))
    try:
        n.start_wallet()
        n.start_coordinator()
        n.start_miner("miner", extra=("--models", tiny_models))
        n.start_miner("miner2", extra=("--models", tiny_models))
        yield n
    finally:
        n.stop_all()


class User:
    def __init__(self, net: Network, home: Path) -> None:
        self.net = net
        self.env = {
            **os.environ,
            "AITBC_COORDINATOR": net.coord_target,
            "AITBC_WALLET": net.wallet_target,
            "AITBC_KEY_FILE": str(home / "key"),
            "ADMIN_TOKEN": net.ids["admin"].token,
            "COORDINATOR_PUBLIC_KEY": net.coordinator_key.public_key.hex(),
        }

    def __call__(self, *args: str, code: int = 0) -> str:
        out = subprocess.run([AITBC, *args], env=self.env, capture_output=True, text=True, timeout=240)
        assert out.returncode == code, f"aitbc {' '.join(args)} exited {out.returncode}:\n{out.stdout}\n{out.stderr}"
        return out.stdout + out.stderr


def test_a_user_runs_every_workload_from_the_command_line(net: Network, tmp_path: Path) -> None:
    aitbc = User(net, tmp_path)
    assert "no key at" in aitbc("balance", code=2)
    created = aitbc("keys", "create")
    assert "no token" in aitbc("jobs", code=2)
    address = next(line.split()[1] for line in created.splitlines() if line.startswith("address"))
    assert address.startswith("ait_") and (tmp_path / "key").stat().st_mode & 0o777 == 0o600
    assert "exists" in aitbc("keys", "create", code=2)  # never overwrites a key by accident
    # The network's admin issues a client token for that address.
    issued = subprocess.run(
        [sys.executable, "-m", "aitbc.tokens", "issue", "--file", str(net.root / "principals.json"),
         "--name", "cli-user", "--role", "client", "--address", address],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    aitbc.env["AITBC_TOKEN"] = issued.stdout.strip()
    assert "now holds 50.000000 AIT" in aitbc("faucet", "--amount", "50")
    assert "available 50.000000 AIT" in aitbc("balance")

    jobs = {}
    for name, args in {
        "matmul": ["matmul", "--n", "64", "--seed", "3"],
        "llm": ["llm", "--model", "tiny-gpt2", "--prompt", "hello world", "--max-new-tokens", "8"],
        "embed": ["embed", "a gpu marketplace", "verified work"],
        "sd": ["sd", "--model", "tiny-sd", "--prompt", "a red fox", "--width", "32", "--height", "32",
               "--steps", "2", "--seed", "1"],
    }.items():  # fmt: skip
        out = aitbc("submit", *args)
        job_id = out.split()[1]
        jobs[name] = job_id
        assert f"{job_id}  QUEUED" in out or f"{job_id}  ASSIGNED" in out  # the live display, one line a change
        assert "state     SETTLED" in out and "verdict   ACCEPTED" in out, out
        if name != "matmul":  # verified by two miners agreeing
            assert "run       miner-1: ACCEPTED" in out and "run       miner-2: ACCEPTED" in out, out
    listing = aitbc("jobs")
    for job_id in jobs.values():
        assert job_id in listing
    assert listing.count("SETTLED") == 4
    assert "SETTLED" in aitbc("watch", jobs["matmul"])

    png = tmp_path / "fox.png"
    assert "sha256 checked" in aitbc("result", jobs["sd"], "-o", str(png))
    assert png.read_bytes().startswith(b"\x89PNG")
    verified = aitbc("verify-receipt", f"{png}.job", "--output", str(png))
    assert "verified:" in verified and "FAIL" not in verified
    # Offline checks catch tampering: with the output, the receipt, the key.
    tampered = tmp_path / "tampered.png"
    tampered.write_bytes(png.read_bytes()[:-1] + b"\0")
    assert "FAIL" in aitbc("verify-receipt", f"{png}.job", "--output", str(tampered), code=4)
    job = cpb.Job.FromString(Path(f"{png}.job").read_bytes())
    body = bytearray(job.receipt.body)
    body[len(body) // 2] ^= 1
    job.receipt.body = bytes(body)
    (tmp_path / "bad.job").write_bytes(job.SerializeToString())
    assert "receipt" in aitbc("verify-receipt", str(tmp_path / "bad.job"), code=4)
    other_key = "00" * 31 + "01"
    assert "settlement" in aitbc("verify-receipt", f"{png}.job", "--coordinator-key", other_key, code=4)

    friend = address_of(KeyPair.generate().public_key)
    sent = aitbc("transfer", friend, "1.5", "--memo", "thanks", "--request-id", "gift-1")
    assert "sent 1.500000 AIT" in sent
    aitbc("transfer", friend, "1.5", "--memo", "thanks", "--request-id", "gift-1")  # a retry moves nothing twice
    assert "REQUEST_ID_REUSED" in aitbc("transfer", friend, "9", "--request-id", "gift-1", code=3)
    history = aitbc("history")
    assert "mint" in history and "hold" in history and "settle" in history
    assert history.count("transfer") == 1 and friend in history
    # Failures say what happened and exit 3.
    assert "NOT_FOUND" in aitbc("cancel", "job_nope", code=3)
    assert "FAILED_PRECONDITION" in aitbc("submit", "matmul", "--n", "4096", "--max-price", "10", code=3)
