"""Workloads run in worker processes, one per slot (one slot per GPU, pinned
with CUDA_VISIBLE_DEVICES), so a job that raises, crashes its process, runs
past its time or is cancelled costs one worker, never the sidecar. A killed
worker is replaced before the slot takes its next job. Workers are spawned
(CUDA does not survive a fork) and kept between jobs, so torch and any loaded
model stay warm."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import structlog

from miner_svc import _worker_progress
from miner_svc._runs import RunOutcome

log = structlog.get_logger()


class JobFailed(Exception):
    """The job did not produce a result; the message says why, for the client."""


def run_job(spec_bytes: bytes, device: str, out_path: str, models: dict[str, str] | None = None) -> RunOutcome:
    """Entry point inside the worker process. `models` maps "workload/name"
    to the local folder of each model this miner holds."""
    from aitbc.v1 import coordinator_pb2
    from aitbc.workloads.registry import workload_of

    spec = coordinator_pb2.JobSpec.FromString(spec_bytes)
    workload, params = workload_of(spec)
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("torch cannot use CUDA here: check the driver and that torch is a CUDA build")
    out = Path(out_path)
    if workload.name == "matmul":
        from miner_svc._run_matmul import run_matmul

        return run_matmul(params, device, out)
    model = (models or {}).get(f"{workload.name}/{workload.model(params)}")
    if model is None:
        raise RuntimeError(f"this miner does not hold {workload.name} model {workload.model(params)!r}")
    if workload.name == "llm_gen":
        from miner_svc._run_llm import run_llm

        return run_llm(params, device, out, model)
    if workload.name == "embed":
        from miner_svc._run_embed import run_embed

        return run_embed(params, device, out, model)
    if workload.name == "sd_infer":
        from miner_svc._run_sd import run_sd

        return run_sd(params, device, out, model)
    raise RuntimeError(f"this miner cannot run {workload.name}")


def _die_with(parent: int) -> None:
    """A worker must not outlive its sidecar (SIGKILL, the OOM killer): it
    would hold its GPU and memory with nobody to report to. Linux kills us
    when the thread that spawned us ends, which is the sidecar's event loop
    thread; a parent already gone before prctl took effect is caught by the
    pid check."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


def _worker_main(conn: Connection, env: dict[str, str], target: Callable[..., Any], parent: int) -> None:
    _die_with(parent)
    _worker_progress.connection = conn
    os.environ.update(env)
    # Models load from local folders only: never reach for the Hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    # The sidecar handles Ctrl-C and SIGTERM; a worker just works until told.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    cap = _apply_vram_cap(env.get(VRAM_CAP_ENV, ""))
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        try:
            conn.send(("ok", target(*msg)))
        except BaseException as exc:  # report everything
            if type(exc).__name__ == "OutOfMemoryError":
                # torch.OutOfMemoryError: the job hit this slot's cap (or the
                # card). The slot kills this worker so the next job starts
                # on a clean CUDA context, not on fragments.
                conn.send(("fatal", f"exceeded its VRAM cap{cap} and was killed: {exc}".split("\n")[0][:400]))
            else:
                conn.send(("error", f"{type(exc).__name__}: {exc}"))


VRAM_CAP_ENV = "AITBC_VRAM_CAP_FRACTION"


def _apply_vram_cap(fraction: str) -> str:
    """Cap this worker's CUDA allocations at a fraction of its GPU's memory;
    returns how the cap reads in a failure message ("" when none)."""
    try:
        import torch
    except ImportError:
        return ""
    if not fraction or not torch.cuda.is_available():
        return ""
    value = float(fraction)
    torch.cuda.set_per_process_memory_fraction(value, 0)
    total = torch.cuda.get_device_properties(0).total_memory
    return f" of {value * total / 2**30:.1f} GiB"


class Slot:
    def __init__(self, index: int, env: dict[str, str], target: Callable[..., Any] = run_job) -> None:
        self.index = index
        self._env = env
        self._target = target
        self._proc: Any = None
        self._conn: Connection | None = None

    def start(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            return
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        self._proc = ctx.Process(
            target=_worker_main,
            args=(child, self._env, self._target, os.getpid()),
            name=f"aitbc-slot-{self.index}",
            daemon=True,
        )
        self._proc.start()
        child.close()
        self._conn = parent

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    async def run(self, *args: Any, max_runtime: float, on_progress: Callable[[float, str], None] | None = None) -> Any:
        """Run target(*args) in the worker. Raises JobFailed with the reason
        on an exception, a crash or a timeout; on cancellation the worker is
        killed at once. Progress reports go to on_progress."""
        self.start()
        assert self._conn is not None
        conn = self._conn
        conn.send(args)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max_runtime
        while True:
            try:
                ready = await loop.run_in_executor(None, conn.poll, max(0.0, deadline - loop.time()))
            except asyncio.CancelledError:
                self.kill("cancelled")
                raise
            if not ready:
                self.kill("timeout")
                raise JobFailed(f"exceeded its max runtime of {max_runtime:g} s and was killed")
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                code = self._reap()
                raise JobFailed(f"the worker process died (exit code {code})") from None
            if msg[0] == "progress":
                if on_progress is not None:
                    on_progress(msg[1], msg[2])
                continue
            status, value = msg
            if status == "fatal":
                self.kill("vram cap")
                raise JobFailed(str(value))
            if status == "error":
                raise JobFailed(str(value))
            return value

    def kill(self, why: str) -> None:
        if self._proc is None:
            return
        log.info("worker_killed", slot=self.index, pid=self._proc.pid, reason=why)
        self._proc.kill()
        self._reap()

    def _reap(self) -> int | None:
        proc, self._proc = self._proc, None
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if proc is None:
            return None
        proc.join(timeout=5)
        return int(proc.exitcode) if proc.exitcode is not None else None

    def stop(self) -> None:
        if self._proc is None:
            return
        try:
            assert self._conn is not None
            self._conn.send(None)
            self._proc.join(timeout=2)
        except (OSError, AssertionError):
            pass
        if self._proc is not None and self._proc.is_alive():
            self._proc.kill()
        self._reap()


class SlotPool:
    """The host's slots; a job takes a free one for its run."""

    def __init__(self, slots: list[Slot]) -> None:
        self.slots = slots
        self._free: asyncio.Queue[Slot] | None = None

    def warm(self) -> None:
        for slot in self.slots:
            slot.start()

    def has_free_slot(self) -> bool:
        return self._free is None or not self._free.empty()

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[Slot]:
        """A free slot for the length of one job."""
        if self._free is None:
            self._free = asyncio.Queue()
            for slot in self.slots:
                self._free.put_nowait(slot)
        slot = await self._free.get()
        try:
            yield slot
        finally:
            self._free.put_nowait(slot)

    def shutdown(self) -> None:
        for slot in self.slots:
            slot.stop()
