"""GPU inventory through NVML. No NVML or no GPU means CPU mode: said once
in the log, never a crash."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

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


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def inventory() -> list[Gpu]:
    try:
        import pynvml
    except ImportError:
        log.info("cpu_mode", reason="nvidia-ml-py is not installed")
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        log.info("cpu_mode", reason=f"NVML unavailable: {exc}")
        return []
    try:
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        cuda = pynvml.nvmlSystemGetCudaDriverVersion_v2()
        cuda_text = f"{cuda // 1000}.{cuda % 1000 // 10}"
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            gpus.append(
                Gpu(
                    index=i,
                    name=_text(pynvml.nvmlDeviceGetName(h)),
                    uuid=_text(pynvml.nvmlDeviceGetUUID(h)),
                    memory_total_bytes=int(pynvml.nvmlDeviceGetMemoryInfo(h).total),
                    driver_version=driver,
                    cuda_version=cuda_text,
                )
            )
        if not gpus:
            log.info("cpu_mode", reason="NVML sees no GPU")
        return gpus
    except pynvml.NVMLError as exc:
        log.warning("cpu_mode", reason=f"NVML query failed: {exc}")
        return []
    finally:
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()
