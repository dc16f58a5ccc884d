"""NVML inventory, telemetry and energy per job, against a fake NVML with a
few GPUs (with and without an energy counter), and the real one's absence."""

from __future__ import annotations

import sys
import time
import types
from collections.abc import Iterator
from typing import Any

import pytest

from miner_svc import _gpu


class NVMLError(Exception):
    pass


class NVMLError_NotSupported(NVMLError):
    pass


def fake_nvml(gpus: list[dict[str, Any]]) -> types.ModuleType:
    m = types.ModuleType("pynvml")
    m.NVMLError = NVMLError  # type: ignore[attr-defined]
    m.NVMLError_NotSupported = NVMLError_NotSupported  # type: ignore[attr-defined]
    m.NVML_TEMPERATURE_GPU = 0  # type: ignore[attr-defined]
    m.calls = []  # type: ignore[attr-defined]

    def ns(**kw: Any) -> types.SimpleNamespace:
        return types.SimpleNamespace(**kw)

    def energy(h: int) -> int:
        counter = gpus[h].get("energy_mj")
        if counter is None:
            raise NVMLError_NotSupported("Not Supported")
        return int(next(counter))

    m.__dict__.update(
        nvmlInit=lambda: m.calls.append("init"),
        nvmlShutdown=lambda: m.calls.append("shutdown"),
        nvmlSystemGetDriverVersion=lambda: "550.54.15",
        nvmlSystemGetCudaDriverVersion_v2=lambda: 12040,
        nvmlDeviceGetCount=lambda: len(gpus),
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetName=lambda h: gpus[h]["name"],
        nvmlDeviceGetUUID=lambda h: f"GPU-{h:04d}",
        nvmlDeviceGetMemoryInfo=lambda h: ns(total=gpus[h]["vram"], used=gpus[h]["used"], free=0),
        nvmlDeviceGetUtilizationRates=lambda h: ns(gpu=gpus[h]["util"], memory=0),
        nvmlDeviceGetPowerUsage=lambda h: gpus[h]["power_mw"],
        nvmlDeviceGetTemperature=lambda h, sensor: gpus[h]["temp"],
        nvmlDeviceGetTotalEnergyConsumption=energy,
    )
    return m


GPUS = [
    {"name": "NVIDIA H100 80GB HBM3", "vram": 80 * 2**30, "used": 2**30, "util": 97, "power_mw": 612_000,
     "temp": 71, "energy_mj": iter([5_000_000, 5_250_500])},
    {"name": "NVIDIA GeForce RTX 2080", "vram": 8 * 2**30, "used": 0, "util": 0, "power_mw": 300_000, "temp": 40},
]  # fmt: skip


@pytest.fixture
def nvml(monkeypatch: pytest.MonkeyPatch) -> Iterator[types.ModuleType]:
    fake = fake_nvml(GPUS)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    yield fake


def test_inventory_reads_every_gpu(nvml: types.ModuleType) -> None:
    gpus = _gpu.inventory()
    assert [g.name for g in gpus] == ["NVIDIA H100 80GB HBM3", "NVIDIA GeForce RTX 2080"]
    assert gpus[0] == _gpu.Gpu(0, "NVIDIA H100 80GB HBM3", "GPU-0000", 80 * 2**30, "550.54.15", "12.4")
    assert nvml.calls == ["init", "shutdown"]


def test_telemetry_for_heartbeats(nvml: types.ModuleType) -> None:
    session = _gpu.Nvml()
    try:
        t = session.telemetry()
    finally:
        session.close()
    assert t[0] == _gpu.Telemetry(0, 97, 2**30, 612.0, 71)
    assert t[1].power_watts == 300.0


def test_energy_from_the_counter(nvml: types.ModuleType) -> None:
    session = _gpu.Nvml()
    with session.energy_meter(0) as meter:
        pass
    assert meter.joules == pytest.approx(250.5)  # (5,250,500 - 5,000,000) mJ


def test_energy_by_sampling_power_where_there_is_no_counter(nvml: types.ModuleType) -> None:
    session = _gpu.Nvml()
    started = time.monotonic()
    with session.energy_meter(1) as meter:
        time.sleep(0.5)
    elapsed = time.monotonic() - started
    # 300 W integrated over the run, give or take the last sample period.
    assert 300 * (elapsed - 0.15) <= meter.joules <= 300 * elapsed


def test_no_nvml_means_cpu_mode_not_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    broken = fake_nvml([])

    def fail() -> None:
        raise NVMLError("NVML Shared Library Not Found")

    broken.nvmlInit = fail  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pynvml", broken)
    assert _gpu.inventory() == []
    session = _gpu.Nvml()
    assert session.telemetry() == []
    with session.energy_meter(0) as meter:
        pass
    assert meter.joules == 0.0


def test_the_real_nvml_agrees_with_inventory() -> None:
    """Without a GPU (this machine) NVML fails to load and inventory is
    empty; on a GPU host it lists what NVML counts."""
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        expected = 0
    else:
        expected = pynvml.nvmlDeviceGetCount()
        pynvml.nvmlShutdown()
    assert len(_gpu.inventory()) == expected
