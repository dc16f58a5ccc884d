"""embed: sentence embeddings, by default with the packaged all-MiniLM-L6-v2.

Vectors are mean-pooled and L2-normalised, so every component lies in
[-1, 1] and two honest runs differ only by float rounding: redundant runs
agree when no component differs by more than TOLERANCE (cosine similarity
then stays above 0.9999 for these 384-dimensional vectors), while a random
or another job's output differs by O(0.1) in most components.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from aitbc.errors import InvalidArgument
from aitbc.v1 import coordinator_pb2, workloads_pb2
from aitbc.workloads.base import Check, Workload, check_model_name, check_text, parse_output

NAME = "embed"
DEFAULT_MODEL = "all-minilm-l6-v2"
MAX_TEXTS = 256
MAX_TEXT_BYTES = 8192
MAX_DIMENSIONS = 4096
TOLERANCE = 1e-3
NORM_TOLERANCE = 1e-3
# The vector length of each model this network embeds with: the
# coordinator's own knowledge, like its price table, never a miner's word.
# Taking the first run's length instead would let two colluding miners
# agree on 1-dimensional vectors (each +-1.0, a unit vector) and be paid; a
# job for a model not listed here is refused at submit. A coordinator adds
# models with its EMBED_MODELS option (register_models).
MODEL_DIMENSIONS: dict[str, int] = {DEFAULT_MODEL: 384}


def register_models(dimensions: dict[str, int]) -> None:
    """Add embed models (name -> vector length) to those jobs may name."""
    for name, dims in dimensions.items():
        check_model_name(name, "EMBED_MODELS")
        if not 1 <= dims <= MAX_DIMENSIONS:
            raise ValueError(f"EMBED_MODELS: {name} has {dims} dimensions, outside 1..{MAX_DIMENSIONS}")
    MODEL_DIMENSIONS.update(dimensions)


def parse_models(text: str) -> dict[str, int]:
    """ "name=dimensions,…" (the EMBED_MODELS option)."""
    out: dict[str, int] = {}
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        name, eq, dims = entry.partition("=")
        if not eq or not dims.strip().isdigit():
            raise ValueError(f"EMBED_MODELS entry {entry!r} is not name=dimensions")
        out[name.strip()] = int(dims)
    return out


@dataclass(frozen=True)
class EmbedParams:
    model: str
    texts: tuple[str, ...]


class Embed(Workload[EmbedParams]):
    name = NAME
    unit = "text"
    # MiniLM-sized models: ~10 ms a text on a laptop CPU.
    cpu_secs_per_unit = 0.2
    gpu_secs_per_unit = 0.02

    def params(self, spec: coordinator_pb2.JobSpec) -> EmbedParams:
        p = spec.embed
        model = check_model_name(p.model or DEFAULT_MODEL, "spec.embed.model")
        if model not in MODEL_DIMENSIONS:
            raise InvalidArgument(
                f"spec.embed.model {model!r} is not one this coordinator knows the vector length of "
                f"({', '.join(sorted(MODEL_DIMENSIONS))})",
                field="spec.embed.model",
                reason="UNKNOWN_MODEL",
            )
        if not 1 <= len(p.texts) <= MAX_TEXTS:
            raise InvalidArgument(
                f"spec.embed.texts must hold 1..{MAX_TEXTS} texts, got {len(p.texts)}", field="spec.embed.texts"
            )
        for i, text in enumerate(p.texts):
            check_text(text, f"spec.embed.texts[{i}]", max_bytes=MAX_TEXT_BYTES)
        return EmbedParams(model, tuple(p.texts))

    def model(self, params: EmbedParams) -> str:
        return params.model

    def work_units(self, params: EmbedParams) -> int:
        return len(params.texts)

    def dimensions(self, params: EmbedParams) -> int:
        return MODEL_DIMENSIONS.get(params.model, 0)

    def max_output_size(self, params: EmbedParams) -> int:
        # The packed floats, their field's tag and length, the dimensions field.
        return 32 + len(params.texts) * (self.dimensions(params) or MAX_DIMENSIONS) * 4

    def vectors(self, params: EmbedParams, output: bytes) -> np.ndarray | None:
        out = parse_output(workloads_pb2.EmbedOutput, output)
        if out is None or out.dimensions != self.dimensions(params):
            return None
        if len(out.values) != out.dimensions * len(params.texts):
            return None
        return np.asarray(out.values, dtype=np.float32).reshape(len(params.texts), out.dimensions)

    def check(self, params: EmbedParams, output: bytes) -> Check:
        v = self.vectors(params, output)
        if v is None:
            dims = self.dimensions(params)
            return Check(False, f"output is not {len(params.texts)} vectors of {dims} dimensions ({params.model})")
        if not np.isfinite(v).all():
            return Check(False, "output holds NaN or infinity")
        worst = float(np.abs(np.linalg.norm(v.astype(np.float64), axis=1) - 1.0).max())
        if worst > NORM_TOLERANCE:
            return Check(False, f"vectors are not unit length (off by up to {worst:.3g})")
        return Check(True, f"{v.shape[0]} vectors of {v.shape[1]} dimensions")

    def agree(self, params: EmbedParams, a: bytes, b: bytes) -> Check:
        x, y = self.vectors(params, a), self.vectors(params, b)
        if x is None or y is None or x.shape != y.shape:
            return Check(False, "the vectors have different shapes")
        worst = float(np.abs(x - y).max())
        if worst > TOLERANCE:
            return Check(False, f"vectors differ by up to {worst:.3g} (tolerance {TOLERANCE:g})", worst / TOLERANCE)
        return Check(True, f"vectors agree within {worst:.3g}", worst / TOLERANCE)
