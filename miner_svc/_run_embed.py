"""The torch side of embed: a sentence-transformers model (the packaged
all-MiniLM-L6-v2 by default) run with transformers alone: mean pooling over
the attention mask, then L2 normalisation, as the model was trained.
Runs inside a worker process."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from aitbc.v1 import workloads_pb2
from aitbc.workloads.embed import EmbedParams
from miner_svc._runs import RunOutcome, device_label, finish, loaded
from miner_svc._worker_progress import report_progress

BATCH = 32
MAX_TOKENS = 256  # all-MiniLM-L6-v2's max_seq_length


def _load(model_path: str, device: str) -> tuple[Any, Any]:
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    model = AutoModel.from_pretrained(model_path, local_files_only=True).to(device).eval()
    return tokenizer, model


def run_embed(params: EmbedParams, device: str, out_path: Path, model_path: str) -> RunOutcome:
    import torch

    dev = torch.device(device)
    tokenizer, model = loaded(("embed", model_path, device), lambda: _load(model_path, device))
    vectors = []
    start = time.perf_counter()
    with torch.inference_mode():
        for first in range(0, len(params.texts), BATCH):
            batch = list(params.texts[first : first + BATCH])
            enc = tokenizer(batch, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt").to(dev)
            hidden = model(**enc).last_hidden_state.float()
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            vectors.append(torch.nn.functional.normalize(pooled, p=2, dim=1).cpu())
            done = first + len(batch)
            report_progress(done / len(params.texts), f"{done} of {len(params.texts)} texts")
    elapsed = time.perf_counter() - start
    matrix = torch.cat(vectors)
    output = workloads_pb2.EmbedOutput(dimensions=int(matrix.shape[1]), values=matrix.flatten().tolist())
    return finish(
        out_path,
        output.SerializeToString(deterministic=True),
        device=device_label(torch, dev),
        seconds=elapsed,
        work_items=len(params.texts),
    )
