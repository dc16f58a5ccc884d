"""The sidecar's GPU path on a real NVIDIA GPU: `make gpu-check` runs these
with `pytest -m gpu` on a GPU host. Without CUDA (this project's CI) they
skip; the fakes in tests/test_gpu.py cover the same code on the CPU.

Written without pytest-asyncio, which a stock PyTorch image lacks."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from aitbc.v1 import coordinator_pb2 as cpb
from aitbc.v1 import workloads_pb2 as wpb
from aitbc.workloads.llm_gen import LlmGen
from aitbc.workloads.matmul import MatmulParams, freivalds
from aitbc.workloads.registry import workload_of
from miner_svc import _gpu
from miner_svc._models import parse_models
from miner_svc._worker import VRAM_CAP_ENV, JobFailed, Slot, run_job
from tests import slot_targets as t


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.timeout(300),
    pytest.mark.skipif(not _cuda(), reason="needs CUDA: run with make gpu-check on a GPU host"),
]


def test_nvml_inventory_is_the_gpus_torch_sees() -> None:
    import torch

    gpus = _gpu.inventory()
    assert len(gpus) == torch.cuda.device_count() > 0
    props = torch.cuda.get_device_properties(0)
    assert gpus[0].name == torch.cuda.get_device_name(0)
    # NVML counts the whole card; CUDA leaves out what the driver reserves.
    assert 0.9 * gpus[0].memory_total_bytes <= props.total_memory <= gpus[0].memory_total_bytes
    assert gpus[0].uuid.startswith("GPU-") and gpus[0].driver_version and gpus[0].cuda_version


def test_telemetry_reads_the_live_card() -> None:
    import torch

    session = _gpu.Nvml()
    try:
        before = session.telemetry()[0]
        block = torch.empty(4 * 2**30, dtype=torch.uint8, device="cuda")
        torch.cuda.synchronize()
        after = session.telemetry()[0]
        del block
    finally:
        session.close()
    assert 10 < after.power_watts < 2000, after
    assert 5 < after.temperature_celsius < 110, after
    assert 0 <= after.utilization_percent <= 100, after
    assert after.memory_used_bytes - before.memory_used_bytes >= 3.5 * 2**30, (before, after)


def test_the_energy_counter_moves_while_the_gpu_works() -> None:
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    session = _gpu.Nvml()
    try:
        started = time.perf_counter()
        with session.energy_meter(0) as meter:
            while time.perf_counter() - started < 2.0:
                for _ in range(20):
                    a @ a
                torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
    finally:
        session.close()
    watts = meter.joules / elapsed
    print(f"energy over {elapsed:.2f} s of bf16 matmuls: {meter.joules:.0f} J, {watts:.0f} W average")
    assert 30 < watts < 2000, (meter.joules, elapsed)


def test_a_job_past_its_vram_cap_is_killed_and_the_next_one_runs() -> None:
    gpu = _gpu.inventory()[0]
    cap = 0.05  # of an 80-141 GiB card: 4-7 GiB
    slot = Slot(0, {"CUDA_VISIBLE_DEVICES": gpu.uuid, VRAM_CAP_ENV: str(cap)}, target=t.allocate_cuda)
    over = cap * gpu.memory_total_bytes / 2**30 * 1.5

    async def go() -> None:
        slot.start()
        with pytest.raises(JobFailed) as err:
            await slot.run(over, max_runtime=120)
        assert str(err.value).startswith("exceeded its VRAM cap of "), err.value
        assert slot.pid is None  # the worker went with its CUDA context
        assert await slot.run(over / 3, max_runtime=120) == f"held {int(over / 3 * 2**30) / 2**30:.1f} GiB"

    try:
        asyncio.run(go())
    finally:
        slot.stop()


@pytest.mark.parametrize("dtype", [wpb.DTYPE_FP32, wpb.DTYPE_FP16, wpb.DTYPE_BF16])
def test_matmul_on_cuda_passes_freivalds(tmp_path: Path, dtype: int) -> None:
    spec = cpb.JobSpec(matmul=wpb.MatmulParams(n=4096, dtype=dtype, seed=11, repeats=3))  # type: ignore[arg-type]
    outcome = run_job(spec.SerializeToString(), "cuda", str(tmp_path / "c.bin"))
    assert outcome.device.startswith("cuda:"), outcome.device
    _, params = workload_of(spec)
    assert isinstance(params, MatmulParams)
    check = freivalds(params, Path(outcome.output_path).read_bytes())
    print(f"{params.dtype}: {outcome.tflops:.1f} TFLOP/s, {check.detail}, worst {check.worst_ratio:.3g} of tolerance")
    assert check.ok, check.detail


def test_llm_gen_on_cuda_is_deterministic_and_compared_with_the_cpu(tmp_path: Path, tiny_models: str) -> None:
    models = parse_models(tiny_models)
    spec = cpb.JobSpec(llm_gen=wpb.LlmGenParams(model="tiny-gpt2", prompt="the quick brown", max_new_tokens=24))
    _, params = workload_of(spec)
    outs = {}
    for name, device in (("cuda1", "cuda"), ("cuda2", "cuda"), ("cpu", "cpu")):
        outcome = run_job(spec.SerializeToString(), device, str(tmp_path / f"{name}.pb"), models)
        outs[name] = Path(outcome.output_path).read_bytes()
    same_kind = LlmGen().agree(params, outs["cuda1"], outs["cuda2"])
    assert same_kind.ok, same_kind.detail
    # Redundancy pairs any two miners; whether a GPU and a CPU agree is
    # reported, not promised (docs/DECISIONS.md).
    print(f"llm_gen cuda vs cpu: {LlmGen().agree(params, outs['cuda1'], outs['cpu']).detail}")
