"""Workloads that misbehave, run inside real worker processes by
tests/test_worker_slots.py (they must be importable from a spawned child)."""

from __future__ import annotations

import os
import time


def echo(value: str) -> str:
    return f"echo {value} from {os.getpid()}"


def raise_error(message: str) -> str:
    raise ValueError(message)


def die(code: int) -> str:
    os._exit(code)


def sleep(seconds: float) -> str:
    time.sleep(seconds)
    return "slept"


def env(name: str) -> str:
    return os.environ.get(name, "<unset>")


def exhaust_vram() -> str:
    """What torch raises when a job allocates past the slot's VRAM cap."""
    import torch

    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


def run_then_count_loads(spec_bytes: bytes, out_path: str, models: dict[str, str]) -> int:
    """A real job through the worker's entry point; how many model loads
    this worker process has done so far."""
    from miner_svc import _runs
    from miner_svc._worker import run_job

    run_job(spec_bytes, "cpu", out_path, models)
    return _runs.loads


def allocate_cuda(gib: float) -> str:
    """Hold `gib` GiB of the slot's GPU, as a job's tensors would."""
    import torch

    block = torch.empty(int(gib * 2**30), dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    return f"held {block.numel() / 2**30:.1f} GiB"
