"""What every workload run shares inside a worker process: the outcome it
reports, writing the output, and the cache that keeps heavy models loaded
between jobs of the same kind."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
# Models a worker keeps loaded; the least recently used beyond this is
# dropped so one slot never holds every model a host offers.
MODELS_KEPT = 2
_models: OrderedDict[tuple[str, ...], Any] = OrderedDict()
# Loads this process has done, for the status and the tests.
loads = 0


@dataclass(frozen=True)
class RunOutcome:
    output_path: str
    output_sha256: bytes
    output_size: int
    device: str
    run_seconds: float
    flops: int = 0
    tflops: float = 0.0
    energy_joules: float = 0.0
    # Tokens generated, texts embedded or denoising steps run.
    work_items: int = 0


def finish(out_path: Path, data: bytes, *, device: str, seconds: float, **usage: Any) -> RunOutcome:
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_bytes(data)
    return RunOutcome(
        output_path=str(out_path),
        output_sha256=hashlib.sha256(data).digest(),
        output_size=len(data),
        device=device,
        run_seconds=seconds,
        **usage,
    )


def device_label(torch: Any, dev: Any) -> str:
    return f"cuda:{torch.cuda.get_device_name(dev)}" if dev.type == "cuda" else "cpu"


def loaded(key: tuple[str, ...], load: Callable[[], T]) -> T:
    """The model under `key`, loading it on first use."""
    if key in _models:
        _models.move_to_end(key)
        return _models[key]
    global loads
    while len(_models) >= MODELS_KEPT:
        _models.popitem(last=False)
    model = load()
    loads += 1
    _models[key] = model
    return model


def loaded_keys() -> list[tuple[str, ...]]:
    return list(_models)
