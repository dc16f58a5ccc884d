"""The torch side of llm_gen. Runs inside a worker process.

Decoding is our own loop over the model's KV cache rather than
`generate()`: the next token is chosen on the CPU in float32 (argmax, or a
draw from a CPU generator seeded by the job), which is what makes the token
ids the same on every honest miner of a device kind."""

from __future__ import annotations

import inspect
import time
from pathlib import Path
from typing import Any

from aitbc.v1 import workloads_pb2
from aitbc.workloads.llm_gen import LlmGenParams
from miner_svc._runs import RunOutcome, device_label, finish, loaded
from miner_svc._worker_progress import report_progress


def _load(model_path: str, device: str) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_path, local_files_only=True)
    model = model.to(device).eval()  # type: ignore[arg-type]
    return tokenizer, model


def run_llm(params: LlmGenParams, device: str, out_path: Path, model_path: str) -> RunOutcome:
    import torch

    dev = torch.device(device)
    tokenizer, model = loaded(("llm_gen", model_path, device), lambda: _load(model_path, device))
    prompt_ids = tokenizer(params.prompt, return_tensors="pt").input_ids
    if prompt_ids.shape[1] == 0:
        raise ValueError("the prompt has no tokens for this model")
    context = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if context and prompt_ids.shape[1] + params.max_new_tokens > context:
        raise ValueError(
            f"prompt ({prompt_ids.shape[1]} tokens) plus max_new_tokens ({params.max_new_tokens}) "
            f"exceed the model's context of {context}"
        )
    eos = tokenizer.eos_token_id
    generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
    generated: list[int] = []
    start = time.perf_counter()
    # transformers renamed past_key_values to cache (in 5.2x); a GPU host's
    # image may hold either, and a wrong name is silently ignored.
    cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.inference_mode():
        cache = None
        step_input = prompt_ids.to(dev)
        for i in range(params.max_new_tokens):
            out = model(input_ids=step_input, use_cache=True, **{cache_name: cache})
            cache = getattr(out, cache_name)
            logits = out.logits[0, -1].float().cpu()
            if generator is None:
                token = int(logits.argmax())
            else:
                logits = logits / params.temperature
                if params.top_k:
                    kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                token = int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator))
            if token == eos:
                break
            generated.append(token)
            step_input = torch.tensor([[token]], device=dev)
            report_progress((i + 1) / params.max_new_tokens, f"token {i + 1} of at most {params.max_new_tokens}")
    elapsed = time.perf_counter() - start
    output = workloads_pb2.LlmGenOutput(
        text=tokenizer.decode(generated, skip_special_tokens=True),
        token_ids=generated,
        prompt_tokens=int(prompt_ids.shape[1]),
    )
    return finish(
        out_path,
        output.SerializeToString(deterministic=True),
        device=device_label(torch, dev),
        seconds=elapsed,
        work_items=len(generated),
    )
