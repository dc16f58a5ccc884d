"""A workload that raises, kills its own process, overruns its time or is
cancelled costs one worker process, never the sidecar; the slot serves the
next job."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from miner_svc._worker import JobFailed, Slot
from tests import slot_targets as t

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def slot() -> Iterator[Slot]:
    s = Slot(0, {"CUDA_VISIBLE_DEVICES": "GPU-test-uuid"}, target=t.echo)
    yield s
    s.stop()


async def test_failures_are_reported_with_their_reason_and_the_slot_lives_on() -> None:
    cases: list[tuple[Callable[..., str], tuple[Any, ...], str]] = [
        (t.raise_error, ("bad input",), "ValueError: bad input"),
        (t.die, (7,), "the worker process died (exit code 7)"),
    ]
    for target, args, reason in cases:
        slot = Slot(0, {}, target=target)
        try:
            with pytest.raises(JobFailed) as err:
                await slot.run(*args, max_runtime=60)
            assert str(err.value) == reason
        finally:
            slot.stop()
    slot = Slot(0, {}, target=t.sleep)
    try:
        with pytest.raises(JobFailed, match=r"exceeded its max runtime of 0\.5 s"):
            await slot.run(30, max_runtime=0.5)
        # A fresh worker takes the next job.
        assert await slot.run(0, max_runtime=60) == "slept"
    finally:
        slot.stop()


async def test_a_crashed_worker_is_replaced_for_the_next_job(slot: Slot) -> None:
    first = await slot.run("a", max_runtime=60)
    pid = slot.pid
    assert first.endswith(str(pid))
    slot._target = t.die  # the same slot, now with a job that kills its process
    slot.kill("test")  # targets bind at start: restart with the new one
    with pytest.raises(JobFailed, match="died"):
        await slot.run(3, max_runtime=60)
    slot._target = t.echo
    again = await slot.run("b", max_runtime=60)
    assert slot.pid != pid and again.endswith(str(slot.pid))


async def test_cancel_kills_the_worker_at_once() -> None:
    slot = Slot(0, {}, target=t.sleep)
    try:
        slot.start()
        task = asyncio.create_task(slot.run(60, max_runtime=120))
        await asyncio.sleep(1.0)
        pid = slot.pid
        assert pid is not None
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # By the time the cancel returns, the worker is gone: the job does
        # not run on in the background.
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    finally:
        slot.stop()


async def test_each_slot_sees_only_its_gpu() -> None:
    slot = Slot(0, {"CUDA_VISIBLE_DEVICES": "GPU-test-uuid"}, target=t.env)
    try:
        assert await slot.run("CUDA_VISIBLE_DEVICES", max_runtime=60) == "GPU-test-uuid"
    finally:
        slot.stop()


async def test_a_job_past_its_vram_cap_is_killed_and_the_slot_gets_a_fresh_worker() -> None:
    slot = Slot(0, {}, target=t.exhaust_vram)
    try:
        slot.start()
        before = slot.pid
        with pytest.raises(JobFailed) as err:
            await slot.run(max_runtime=60)
        assert str(err.value).startswith("exceeded its VRAM cap and was killed: CUDA out of memory")
        assert slot.pid is None  # killed; the next job starts a new worker
        slot.start()
        assert slot.pid not in (None, before)
    finally:
        slot.stop()


async def test_a_model_stays_loaded_between_jobs_of_its_kind(tmp_path: Path, tiny_models: str) -> None:
    from aitbc.v1 import coordinator_pb2 as cpb
    from aitbc.v1 import workloads_pb2 as wpb
    from miner_svc._models import parse_models

    models = parse_models(tiny_models)
    slot = Slot(0, {}, target=t.run_then_count_loads)
    try:
        loads = []
        for i, prompt in enumerate(["hello", "world", "gpus"]):
            spec = cpb.JobSpec(llm_gen=wpb.LlmGenParams(model="tiny-gpt2", prompt=prompt, max_new_tokens=4))
            loads.append(await slot.run(spec.SerializeToString(), str(tmp_path / f"{i}.pb"), models, max_runtime=120))
        sd = cpb.JobSpec(sd_infer=wpb.SdInferParams(model="tiny-sd", prompt="fox", width=32, height=32, steps=1))
        loads.append(await slot.run(sd.SerializeToString(), str(tmp_path / "sd.png"), models, max_runtime=120))
        assert loads == [1, 1, 1, 2]  # loaded once for three jobs; the other kind loads its own
    finally:
        slot.stop()


# A sidecar whose worker is busy with a job (an idle worker would notice its
# pipe close and exit on its own).
ORPHAN = """
import asyncio
from miner_svc._worker import Slot
from tests import slot_targets as t

async def main():
    slot = Slot(0, {}, target=t.sleep)
    slot.start()
    print(slot.pid, flush=True)
    await slot.run(600, max_runtime=900)

asyncio.run(main())
"""


def test_a_killed_sidecar_leaves_no_worker_behind() -> None:
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import ROOT

    parent = subprocess.Popen([sys.executable, "-c", ORPHAN], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        worker = int(parent.stdout.readline())
        time.sleep(1)  # the job is under way
        os.kill(worker, 0)  # alive while its sidecar is
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(worker, 0)
            except ProcessLookupError:
                return
            # A zombie is gone in all but name: reaped by init shortly.
            stat = Path(f"/proc/{worker}/stat")
            if stat.exists() and stat.read_text().split(") ")[1].startswith("Z"):
                return
            time.sleep(0.05)
        pytest.fail(f"worker {worker} outlived its SIGKILLed sidecar")
    finally:
        if parent.poll() is None:
            parent.kill()
