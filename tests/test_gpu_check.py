"""`make gpu-check` and `make gpu-wheels` on a machine without a GPU: the
script's CPU path runs every step a GPU host runs (stubs generated, pytest
-m gpu collected, wallet + coordinator + two sidecars, every workload to
SETTLED), so the script cannot rot between the rare GPU sessions; without
CUDA and without the CPU switch it refuses, saying why."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from aitbc.localnet import ROOT
from bench import gpu_wheels

pytestmark = pytest.mark.timeout(300)


def gpu_check(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    empty = tmp_path / "no-wheels"
    empty.mkdir(exist_ok=True)
    return subprocess.run(
        ["bash", "bench/gpu_check.sh"],
        cwd=ROOT,
        env={**os.environ, "PYTHON": sys.executable, "GPU_WHEELS": str(empty), "GPU_CHECK_OUT": str(tmp_path), **env},
        capture_output=True,
        text=True,
        timeout=280,
    )


def test_the_cpu_path_drives_every_workload_to_settled(tmp_path: Path) -> None:
    run = gpu_check(tmp_path, GPU_CHECK_CPU="1")
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    figures = json.loads((tmp_path / "gpu-check.json").read_text())
    assert figures["failures"] == []
    for dtype in ("fp16", "bf16", "fp32"):
        (row,) = figures["network"]["matmul"][dtype]
        assert row["state"] == "JOB_STATE_SETTLED" and row["device"] == "cpu", row
        assert row["seconds"] > 0 and row["price"] > 0, row
        assert figures["summary"][dtype]["bare_tflops"] > 0
    for workload in ("llm_gen", "sd_infer"):
        assert figures["network"][workload]["state"] == "JOB_STATE_SETTLED", figures["network"][workload]
    assert figures["network"]["llm_gen"]["work_items"] > 0
    # pytest -m gpu ran, and on this CPU skipped every test for want of CUDA.
    junit = (tmp_path / "gpu-tests.xml").read_text()
    assert 'skipped="' in junit and "needs CUDA" in junit
    assert "gpu-check passed" in run.stdout


def test_without_cuda_it_refuses_and_says_why(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this host has CUDA")
    run = gpu_check(tmp_path)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "no CUDA device here" in run.stdout


def test_the_gpu_wheels_are_our_pins_and_leave_the_images_stack_alone() -> None:
    wanted = gpu_wheels.requirements()
    pins = gpu_wheels.pins()
    assert len(wanted) == len(gpu_wheels.WHEELS)
    for line in wanted:
        name, _, version = line.partition("==")
        assert pins[gpu_wheels.canonical(name)] == version
    # The image's CUDA torch and what is built against it must stay its own.
    names = {gpu_wheels.canonical(w) for w in gpu_wheels.WHEELS}
    assert not names & {"torch", "numpy", "transformers", "tokenizers", "nvidia-ml-py", "pytest"}
