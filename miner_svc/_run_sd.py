"""The torch side of sd_infer: a diffusers pipeline loaded from a local
folder, its initial noise drawn from a CPU generator seeded by the job, the
image returned as a PNG. Runs inside a worker process."""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

from aitbc.workloads.sd_infer import SdInferParams
from miner_svc._runs import RunOutcome, device_label, finish, loaded
from miner_svc._worker_progress import report_progress


def _load(model_path: str, device: str) -> Any:
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # "install accelerate" is advice, not news
    pipe = DiffusionPipeline.from_pretrained(model_path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def run_sd(params: SdInferParams, device: str, out_path: Path, model_path: str) -> RunOutcome:
    import torch

    dev = torch.device(device)
    pipe = loaded(("sd_infer", model_path, device), lambda: _load(model_path, device))

    def on_step(_pipe: Any, step: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        report_progress((step + 1) / params.steps, f"step {step + 1} of {params.steps}")
        return kwargs

    start = time.perf_counter()
    with torch.inference_mode():
        image = pipe(
            prompt=params.prompt,
            negative_prompt=params.negative_prompt or None,
            width=params.width,
            height=params.height,
            num_inference_steps=params.steps,
            guidance_scale=params.guidance_scale,
            generator=torch.Generator("cpu").manual_seed(params.seed),
            output_type="pil",
            callback_on_step_end=on_step,
        ).images[0]
    elapsed = time.perf_counter() - start
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return finish(out_path, buf.getvalue(), device=device_label(torch, dev), seconds=elapsed, work_items=params.steps)
