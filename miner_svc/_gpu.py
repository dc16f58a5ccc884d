"""GPUs through NVML: inventory, telemetry, energy per job. No NVML or no
GPU means CPU mode: said once in the log, never a crash."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import structlog

log = structlog.get_logger()


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    uuid: str
    memory_total_bytes: int
    driver_version: str
    cuda_version: str


@dataclass(frozen=True)
class Telemetry:
    index: int
    utilization_percent: int
    memory_used_bytes: int
    power_watts: float
    temperature_celsius: int


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _nvml() -> Any | None:
    try:
        import pynvml
    except ImportError:
        return None
    return pynvml


@contextlib.contextmanager
def _session(nvml: Any) -> Iterator[None]:
    nvml.nvmlInit()
    try:
        yield
    finally:
        with contextlib.suppress(nvml.NVMLError):
            nvml.nvmlShutdown()


def inventory() -> list[Gpu]:
    nvml = _nvml()
    if nvml is None:
        log.info("cpu_mode", reason="nvidia-ml-py is not installed")
        return []
    try:
        with _session(nvml):
            driver = _text(nvml.nvmlSystemGetDriverVersion())
            cuda = nvml.nvmlSystemGetCudaDriverVersion_v2()
            cuda_text = f"{cuda // 1000}.{cuda % 1000 // 10}"
            gpus = []
            for i in range(nvml.nvmlDeviceGetCount()):
                h = nvml.nvmlDeviceGetHandleByIndex(i)
                gpus.append(
                    Gpu(
                        index=i,
                        name=_text(nvml.nvmlDeviceGetName(h)),
                        uuid=_text(nvml.nvmlDeviceGetUUID(h)),
                        memory_total_bytes=int(nvml.nvmlDeviceGetMemoryInfo(h).total),
                        driver_version=driver,
                        cuda_version=cuda_text,
                    )
                )
    except nvml.NVMLError as exc:
        log.info("cpu_mode", reason=f"NVML unavailable: {exc}")
        return []
    if not gpus:
        log.info("cpu_mode", reason="NVML sees no GPU")
    return gpus


class Nvml:
    """A long-lived NVML session for telemetry and energy; inert without one."""

    def __init__(self) -> None:
        self._nvml = _nvml()
        self._handles: list[Any] = []
        if self._nvml is None:
            return
        try:
            self._nvml.nvmlInit()
            self._handles = [self._nvml.nvmlDeviceGetHandleByIndex(i) for i in range(self._nvml.nvmlDeviceGetCount())]
        except self._nvml.NVMLError:
            self._nvml = None

    def close(self) -> None:
        if self._nvml is not None:
            with contextlib.suppress(self._nvml.NVMLError):
                self._nvml.nvmlShutdown()
            self._nvml = None

    def telemetry(self) -> list[Telemetry]:
        nvml = self._nvml
        if nvml is None:
            return []
        out = []
        for i, h in enumerate(self._handles):
            try:
                out.append(
                    Telemetry(
                        index=i,
                        utilization_percent=int(nvml.nvmlDeviceGetUtilizationRates(h).gpu),
                        memory_used_bytes=int(nvml.nvmlDeviceGetMemoryInfo(h).used),
                        power_watts=nvml.nvmlDeviceGetPowerUsage(h) / 1000.0,
                        temperature_celsius=int(nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU)),
                    )
                )
            except nvml.NVMLError as exc:
                log.warning("telemetry_failed", gpu=i, error=str(exc))
        return out

    def energy_meter(self, index: int) -> EnergyMeter:
        return EnergyMeter(self._nvml, self._handles[index] if self._nvml and index < len(self._handles) else None)


class EnergyMeter:
    """Energy a GPU drew over an interval: from its energy counter where it
    has one (Volta and newer), else by sampling power every 50 ms."""

    SAMPLE_SECS = 0.05

    def __init__(self, nvml: Any | None, handle: Any | None) -> None:
        self._nvml, self._h = nvml, handle
        self._start_mj: int | None = None
        self._joules = 0.0
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None

    def __enter__(self) -> EnergyMeter:
        if self._nvml is None or self._h is None:
            return self
        try:
            self._start_mj = int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._h))
        except self._nvml.NVMLError:
            self._sampler = threading.Thread(target=self._sample, name="energy-sampler", daemon=True)
            self._sampler.start()
        return self

    def _sample(self) -> None:
        assert self._nvml is not None
        last = time.monotonic()
        while not self._stop.wait(self.SAMPLE_SECS):
            now = time.monotonic()
            try:
                self._joules += self._nvml.nvmlDeviceGetPowerUsage(self._h) / 1000.0 * (now - last)
            except self._nvml.NVMLError:
                return
            last = now

    def __exit__(self, *exc: object) -> None:
        if self._sampler is not None:
            self._stop.set()
            self._sampler.join()
        elif self._start_mj is not None and self._nvml is not None:
            try:
                self._joules = (int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._h)) - self._start_mj) / 1000
            except self._nvml.NVMLError:
                self._joules = 0.0

    @property
    def joules(self) -> float:
        return self._joules
