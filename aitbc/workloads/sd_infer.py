"""sd_infer: image generation with a diffusers pipeline the miner holds.

The initial noise comes from a CPU generator seeded by the job, so the same
pipeline, parameters and device kind give the same image. Redundant runs
agree when the mean absolute difference of their pixels stays within
TOLERANCE levels of 255: rounding differences move a few pixels by a level
or two, a different or random image moves the mean by tens of levels.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from aitbc.errors import InvalidArgument
from aitbc.v1 import coordinator_pb2
from aitbc.workloads.base import Check, Workload, check_model_name, check_range, check_text

NAME = "sd_infer"
MAX_PROMPT_BYTES = 2048
MAX_SIDE = 1024
MAX_STEPS = 100
DEFAULT_GUIDANCE = 7.5
TOLERANCE = 2.0  # mean absolute difference, in levels of 255


@dataclass(frozen=True)
class SdInferParams:
    model: str
    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    seed: int
    guidance_scale: float


class SdInfer(Workload[SdInferParams]):
    name = NAME
    unit = "kilopixel-step"
    # SD 1.5 at 512x512 (262 kilopixels) with guidance takes 5-10 s a step
    # on a desktop CPU, well under 0.1 s on a GPU; these allow 26 s, 0.5 s.
    cpu_secs_per_unit = 0.1
    gpu_secs_per_unit = 0.002

    def params(self, spec: coordinator_pb2.JobSpec) -> SdInferParams:
        p = spec.sd_infer
        check_model_name(p.model, "spec.sd_infer.model")
        check_text(p.prompt, "spec.sd_infer.prompt", max_bytes=MAX_PROMPT_BYTES)
        check_text(p.negative_prompt, "spec.sd_infer.negative_prompt", max_bytes=MAX_PROMPT_BYTES, allow_empty=True)
        for side in ("width", "height"):
            value = getattr(p, side)
            if not 8 <= value <= MAX_SIDE or value % 8:
                raise InvalidArgument(
                    f"spec.sd_infer.{side} must be a multiple of 8 in 8..{MAX_SIDE}, got {value}",
                    field=f"spec.sd_infer.{side}",
                )
        check_range(p.steps, "spec.sd_infer.steps", 1, MAX_STEPS)
        guidance = p.guidance_scale or DEFAULT_GUIDANCE
        check_range(guidance, "spec.sd_infer.guidance_scale", 0.0, 30.0)
        return SdInferParams(p.model, p.prompt, p.negative_prompt, p.width, p.height, p.steps, p.seed, guidance)

    def model(self, params: SdInferParams) -> str:
        return params.model

    def work_units(self, params: SdInferParams) -> int:
        return -(-params.steps * params.width * params.height // 1000)

    def max_output_size(self, params: SdInferParams) -> int:
        # An RGB PNG never grows much past its raw pixels (stored blocks).
        raw = params.height * (params.width * 3 + 1)
        return raw + raw // 100 + 4096

    def pixels(self, params: SdInferParams, output: bytes) -> np.ndarray | None:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(io.BytesIO(output)) as img:
                if img.format != "PNG" or img.size != (params.width, params.height) or img.mode != "RGB":
                    return None
                return np.asarray(img, dtype=np.int16)
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
            return None

    def check(self, params: SdInferParams, output: bytes) -> Check:
        if self.pixels(params, output) is None:
            return Check(False, f"output is not a {params.width}x{params.height} RGB PNG")
        return Check(True, f"{params.width}x{params.height} PNG")

    def agree(self, params: SdInferParams, a: bytes, b: bytes) -> Check:
        x, y = self.pixels(params, a), self.pixels(params, b)
        if x is None or y is None:
            return Check(False, "not two images of the job's size")
        diff = float(np.abs(x - y).mean())
        if diff > TOLERANCE:
            return Check(False, f"images differ by {diff:.3g} levels on average (tolerance {TOLERANCE:g})")
        return Check(True, f"images agree within {diff:.3g} levels on average", diff / TOLERANCE)
