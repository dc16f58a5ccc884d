"""Every workload end to end through the three services on this machine's
CPU, driven with the real grpcurl binary as a user would: submit, watch to
SETTLED, read the verdicts, fetch the result, see both miners paid."""

from __future__ import annotations

import base64
import hashlib
import io
import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from PIL import Image

from aitbc.localnet import Network, make_network
from aitbc.v1 import workloads_pb2
from tests.grpcurl import grpcurl, stream_objects

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def market(tmp_path_factory: pytest.TempPathFactory, tiny_models: str) -> Iterator[Network]:
    net = make_network(tmp_path_factory.mktemp("market"))
    try:
        net.start_wallet()
        net.start_coordinator()
        for name in ("miner", "miner2"):
            net.start_miner(name, extra=("--models", tiny_models))
        grpcurl(
            net.wallet_target, "aitbc.v1.WalletService/Mint", token=net.ids["admin"].token,
            data={"address": net.ids["client"].address, "amount": str(10**9), "request_id": "fund"},
        )  # fmt: skip
        yield net
    finally:
        net.stop_all()


def balance(net: Network, who: str) -> int:
    out = grpcurl(
        net.wallet_target, "aitbc.v1.WalletService/GetBalance", token=net.ids["admin"].token,
        data={"address": net.ids[who].address},
    )  # fmt: skip
    return int(json.loads(out).get("available", 0))


def coord(net: Network, method: str, data: dict[str, Any]) -> str:
    return grpcurl(net.coord_target, f"aitbc.v1.CoordinatorService/{method}", token=net.ids["client"].token, data=data)


def check_llm(data: bytes) -> None:
    out = workloads_pb2.LlmGenOutput.FromString(data)
    assert 0 < len(out.token_ids) <= 24 and out.prompt_tokens > 0 and out.text


def check_embed(data: bytes) -> None:
    out = workloads_pb2.EmbedOutput.FromString(data)
    assert out.dimensions == 384 and len(out.values) == 2 * 384


def check_png(data: bytes) -> None:
    with Image.open(io.BytesIO(data)) as img:
        assert (img.format, img.size, img.mode) == ("PNG", (64, 64), "RGB")


def check_matmul(data: bytes) -> None:
    assert len(data) == 32 * 32 * 4


LLM = {"model": "tiny-gpt2", "prompt": "hello world of gpus", "max_new_tokens": 24}
CASES: dict[str, tuple[dict[str, Any], Callable[[bytes], None]]] = {
    "llm_gen greedy, redundant by default": ({"llm_gen": LLM}, check_llm),
    "llm_gen sampled, spot-checked": (
        {
            "llm_gen": {**LLM, "sampling": {"seed": "7", "temperature": 0.8, "top_k": 40}},
            "verification": {"spot_check": {"probability": 1.0}},
        },
        check_llm,
    ),
    "embed with the packaged MiniLM": ({"embed": {"texts": ["a gpu marketplace", "verified work"]}}, check_embed),
    "sd_infer": (
        {"sd_infer": {"model": "tiny-sd", "prompt": "a red fox", "width": 64, "height": 64, "steps": 3, "seed": "5"}},
        check_png,
    ),
    "matmul, redundant on request": (
        {"matmul": {"n": 32, "dtype": "DTYPE_FP32", "seed": "9"}, "verification": {"redundant": {"k": 2}}},
        check_matmul,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_workload_runs_verified_and_paid(market: Network, case: str) -> None:
    spec, check_output = CASES[case]
    net = market
    before = {who: balance(net, who) for who in ("client", "miner", "miner2")}
    request = {"request_id": case, "spec": {**spec, "max_price": "100000000"}}
    submitted = json.loads(coord(net, "SubmitJob", request))["job"]
    assert submitted["runs_needed"] == 2  # the client sees what it pays for
    events = stream_objects(coord(net, "WatchJob", {"job_id": submitted["job_id"]}))
    job = events[-1]["job"]
    assert job["state"] == "JOB_STATE_SETTLED", job
    assert job["verdict"] == "VERDICT_ACCEPTED"
    assert [r["verdict"] for r in job["runs"]] == ["VERDICT_ACCEPTED"] * 2
    assert {r["miner_id"] for r in job["runs"]} == {"miner-1", "miner-2"}
    assert len({r["output_sha256"] for r in job["runs"]}) >= 1
    price, to_miners = int(job["price"]), int(job["miner_amount"])
    assert price == int(submitted["price"]) and to_miners + int(job["fee_amount"]) == price
    # One settlement paid both miners the same share.
    assert balance(net, "client") == before["client"] - price
    assert balance(net, "miner") - before["miner"] == balance(net, "miner2") - before["miner2"] == to_miners // 2
    chunks = stream_objects(coord(net, "GetJobResult", {"job_id": job["job_id"]}))
    data = b"".join(base64.b64decode(c.get("data", "")) for c in chunks)
    assert hashlib.sha256(data).digest() == base64.b64decode(job["output_sha256"])
    check_output(data)


def test_a_job_for_a_model_no_miner_holds_waits_and_says_why(market: Network) -> None:
    spec = {"llm_gen": {**LLM, "model": "llama-405b"}, "max_price": "100000000"}
    job = json.loads(coord(market, "SubmitJob", {"request_id": "no-such-model", "spec": spec}))["job"]
    got = json.loads(coord(market, "GetJob", {"job_id": job["job_id"]}))["job"]
    assert got["state"] == "JOB_STATE_QUEUED"
    assert "llama-405b" in got["status_detail"]
    coord(market, "CancelJob", {"job_id": job["job_id"]})
