"""TLS and mutual TLS between every service and the sidecar, made with
`make certs` (aitbc.certs): a job runs and is paid over TLS end to end, and
a stranger's certificate, no certificate, a server the client does not
trust, and plaintext to a TLS port all fail the handshake."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from aitbc.certs import make_dev_certs
from aitbc.localnet import Network, make_network
from aitbc.v1 import coordinator_pb2 as cpb
from aitbc.v1 import coordinator_pb2_grpc, wallet_pb2, wallet_pb2_grpc, workloads_pb2
from tests.conftest import ROOT, md

pytestmark = pytest.mark.timeout(180)


def creds(folder: Path, *, trust: Path | None = None, with_cert: bool = True) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=(trust or folder / "ca.pem").read_bytes(),
        private_key=(folder / "node.key").read_bytes() if with_cert else None,
        certificate_chain=(folder / "node.pem").read_bytes() if with_cert else None,
    )


@pytest.fixture(scope="module")
def tls_net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Network, Path, Path]]:
    root = tmp_path_factory.mktemp("tls")
    ours, theirs = make_dev_certs(root / "ours"), make_dev_certs(root / "theirs")
    net = make_network(root / "net")
    net.tls_flags = [
        "--tls-ca", str(ours / "ca.pem"), "--tls-cert", str(ours / "node.pem"), "--tls-key", str(ours / "node.key")
    ]  # fmt: skip
    try:
        net.start_wallet()
        net.start_coordinator()
        net.start_miner()
        yield net, ours, theirs
    finally:
        net.stop_all()


async def test_a_job_runs_and_is_paid_over_mutual_tls(tls_net: tuple[Network, Path, Path]) -> None:
    net, ours, _ = tls_net
    async with grpc.aio.secure_channel(net.wallet_target, creds(ours)) as wch:
        wallet = wallet_pb2_grpc.WalletServiceStub(wch)
        await wallet.Mint(
            wallet_pb2.MintRequest(address=net.ids["client"].address, amount=10**6, request_id="tls"),
            metadata=md(net.ids["admin"]), timeout=10,
        )  # fmt: skip
        async with grpc.aio.secure_channel(net.coord_target, creds(ours)) as cch:
            coord = coordinator_pb2_grpc.CoordinatorServiceStub(cch)
            spec = cpb.JobSpec(matmul=workloads_pb2.MatmulParams(n=32, dtype=workloads_pb2.DTYPE_FP32), max_price=10**5)
            job = (
                await coord.SubmitJob(cpb.SubmitJobRequest(spec=spec, request_id="t"), metadata=md(net.ids["client"]))
            ).job
            final = None
            async for ev in coord.WatchJob(cpb.WatchJobRequest(job_id=job.job_id), metadata=md(net.ids["client"])):
                final = ev.job
        assert final is not None and final.state == cpb.JOB_STATE_SETTLED, final
        miner = await wallet.GetBalance(
            wallet_pb2.GetBalanceRequest(address=net.ids["miner"].address), metadata=md(net.ids["admin"]), timeout=10
        )
        assert miner.available == final.miner_amount > 0


@pytest.mark.parametrize("how", ["plaintext", "stranger's certificate", "no certificate", "untrusted server"])
async def test_handshakes_that_must_fail(tls_net: tuple[Network, Path, Path], how: str) -> None:
    net, ours, theirs = tls_net
    if how == "plaintext":
        channel = grpc.aio.insecure_channel(net.coord_target)
    elif how == "stranger's certificate":  # trusts our server, presents a cert from another CA
        channel = grpc.aio.secure_channel(
            net.coord_target,
            grpc.ssl_channel_credentials(
                root_certificates=(ours / "ca.pem").read_bytes(),
                private_key=(theirs / "node.key").read_bytes(),
                certificate_chain=(theirs / "node.pem").read_bytes(),
            ),
        )
    elif how == "no certificate":
        channel = grpc.aio.secure_channel(net.coord_target, creds(ours, with_cert=False))
    else:
        channel = grpc.aio.secure_channel(net.coord_target, creds(ours, trust=theirs / "ca.pem"))
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await coordinator_pb2_grpc.CoordinatorServiceStub(channel).ListJobs(
                cpb.ListJobsRequest(), metadata=md(net.ids["client"]), timeout=5
            )
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value


def test_plaintext_off_loopback_is_refused_unless_allowed(tmp_path: Path) -> None:
    net = make_network(tmp_path / "net")
    base = [
        sys.executable, "-m", "wallet_svc", "--host", "0.0.0.0", "--port", "0", "--db", str(tmp_path / "w.sqlite"),
        "--tokens-file", str(net.root / "principals.json"), "--treasury-address", net.treasury,
        "--coordinator-public-key", net.coordinator_key.public_key.hex(),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(base, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "refusing to serve plaintext on 0.0.0.0" in out.stderr
    ready = tmp_path / "ready"
    proc = subprocess.Popen([*base, "--allow-plaintext", "true", "--ready-file", str(ready)], cwd=ROOT, env=env)
    try:
        from aitbc.devnet import wait_ready

        assert wait_ready(ready, proc, "wallet") > 0
    finally:
        proc.terminate()
        proc.wait(timeout=20)
