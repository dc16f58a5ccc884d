"""llm_gen: text generation with a causal language model the miner holds.

Generation is deterministic for the same model, parameters and device kind:
greedy decoding takes the argmax, and seeded sampling draws from a CPU
generator over float32 probabilities computed on the CPU, so two honest
miners produce the same token ids and redundant runs compare them exactly.
The price counts tokens the coordinator can see without the model: the
tokens asked for, plus the prompt at four bytes a token.
"""

from __future__ import annotations

from dataclasses import dataclass

from aitbc.v1 import coordinator_pb2, workloads_pb2
from aitbc.workloads.base import Check, Workload, check_model_name, check_range, check_text, parse_output

NAME = "llm_gen"
MAX_PROMPT_BYTES = 8192
MAX_NEW_TOKENS = 1024
PROMPT_BYTES_PER_TOKEN = 4
# Most bytes one generated token can decode to, for the upload limit
# (generous: an honest output cut off here would be refused as bad).
MAX_BYTES_PER_TOKEN = 256
# Tokens a tokenizer may add to a prompt beyond one per byte (BOS, EOS, ...).
MAX_SPECIAL_TOKENS = 8


@dataclass(frozen=True)
class LlmGenParams:
    model: str
    prompt: str
    max_new_tokens: int
    # None: greedy.
    seed: int | None
    temperature: float
    top_k: int


class LlmGen(Workload[LlmGenParams]):
    name = NAME
    unit = "token"
    # A 7B model on a slow CPU decodes about a token a second.
    cpu_secs_per_unit = 2.0
    gpu_secs_per_unit = 0.2

    def params(self, spec: coordinator_pb2.JobSpec) -> LlmGenParams:
        p = spec.llm_gen
        check_model_name(p.model, "spec.llm_gen.model")
        check_text(p.prompt, "spec.llm_gen.prompt", max_bytes=MAX_PROMPT_BYTES)
        check_range(p.max_new_tokens, "spec.llm_gen.max_new_tokens", 1, MAX_NEW_TOKENS)
        seed, temperature, top_k = None, 1.0, 0
        if p.HasField("sampling"):
            s = p.sampling
            seed, temperature, top_k = s.seed, s.temperature or 1.0, s.top_k
            check_range(temperature, "spec.llm_gen.sampling.temperature", 1e-3, 10.0)
            check_range(top_k, "spec.llm_gen.sampling.top_k", 0, 1000)
        return LlmGenParams(p.model, p.prompt, p.max_new_tokens, seed, temperature, top_k)

    def model(self, params: LlmGenParams) -> str:
        return params.model

    def work_units(self, params: LlmGenParams) -> int:
        prompt = -(-len(params.prompt.encode()) // PROMPT_BYTES_PER_TOKEN)
        return params.max_new_tokens + prompt

    def max_output_size(self, params: LlmGenParams) -> int:
        return 64 + params.max_new_tokens * (MAX_BYTES_PER_TOKEN + 5)

    def check(self, params: LlmGenParams, output: bytes) -> Check:
        out = parse_output(workloads_pb2.LlmGenOutput, output)
        if out is None:
            return Check(False, "output is not an LlmGenOutput message")
        if len(out.token_ids) > params.max_new_tokens:
            return Check(False, f"{len(out.token_ids)} tokens generated, more than the {params.max_new_tokens} asked")
        if out.prompt_tokens == 0:
            return Check(False, "output says the prompt has no tokens")
        # No tokenizer makes more tokens than bytes, bar a few special ones.
        if out.prompt_tokens > len(params.prompt.encode()) + MAX_SPECIAL_TOKENS:
            return Check(False, f"output says the prompt has {out.prompt_tokens} tokens, more than its bytes")
        if len(out.text.encode()) > len(out.token_ids) * MAX_BYTES_PER_TOKEN:
            return Check(False, f"{len(out.text.encode())} bytes of text from {len(out.token_ids)} tokens")
        return Check(True, f"{len(out.token_ids)} tokens")

    def agree(self, params: LlmGenParams, a: bytes, b: bytes) -> Check:
        x = workloads_pb2.LlmGenOutput.FromString(a)
        y = workloads_pb2.LlmGenOutput.FromString(b)
        if list(x.token_ids) != list(y.token_ids):
            common = next(
                (i for i, (s, t) in enumerate(zip(x.token_ids, y.token_ids, strict=False)) if s != t),
                min(len(x.token_ids), len(y.token_ids)),
            )
            return Check(False, f"token ids differ from position {common}")
        if x.text != y.text or x.prompt_tokens != y.prompt_tokens:
            return Check(False, "same token ids but different text")
        return Check(True, f"the same {len(x.token_ids)} token ids")
