"""Checking outputs within a budget, and who may referee a disagreement.

Every output check runs here, on threads of its own: the event loop keeps
answering (health, GetJob, heartbeats) while results are checked, and the
checks in flight together hold at most CHECK_MEMORY_BYTES. A check says
what it may hold (Workload.check_memory: a few row blocks for a streamed
matmul, a few copies of the output otherwise) and waits its turn, first
come first served, until that much of the budget is free. A flood of
results queues here; it does not grow the process.

The rest is the rule for redundant runs: runs of one job go to miners with
other payout addresses and operators, and once two runs disagree, every
further run is a referee drawn at random among such miners (see
DECISIONS.md, "Disagreement is refereed").
"""

from __future__ import annotations

import asyncio
import secrets
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, Protocol, TypeVar

from threadpoolctl import threadpool_limits

T = TypeVar("T")


class ByteBudget:
    """A semaphore counted in bytes, first come first served: a large
    request at the head is not overtaken by small ones behind it."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.free = total
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    async def acquire(self, amount: int) -> int:
        """Take `amount` (at most the whole budget); returns what was taken."""
        amount = min(amount, self.total)
        if not self._waiters and self.free >= amount:
            self.free -= amount
            return amount
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((amount, fut))
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # granted as it was cancelled
                self.release(amount)
            raise
        return amount

    def release(self, amount: int) -> None:
        self.free += amount
        while self._waiters:
            want, fut = self._waiters[0]
            if fut.done():  # its waiter was cancelled
                self._waiters.popleft()
                continue
            if self.free < want:
                break
            self._waiters.popleft()
            self.free -= want
            fut.set_result(None)


class CheckRunner:
    def __init__(self, memory_bytes: int, threads: int) -> None:
        self.budget = ByteBudget(memory_bytes)
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="check")
        # One BLAS thread per check: the checks' products are thin (n x 20),
        # where OpenBLAS's own threads only wait on each other, ten times
        # slower on a busy host (measured, 2 cores); parallelism comes from
        # CHECK_THREADS checks at once. Process-wide: the coordinator does no
        # other linear algebra.
        threadpool_limits(limits=1, user_api="blas")

    async def run(self, memory: int, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) on a check thread once `memory` bytes of the budget are
        free. The budget comes back when the thread is done, even if the
        caller is cancelled first (the thread cannot be)."""
        taken = await self.budget.acquire(memory)
        try:
            fut = asyncio.get_running_loop().run_in_executor(self._pool, partial(fn, *args))
        except BaseException:
            self.budget.release(taken)
            raise
        fut.add_done_callback(lambda _: self.budget.release(taken))
        return await fut

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def operator_of(principal_name: str) -> str:
    """The operator behind a miner token, where its name says: the part
    before the first "/" ("alice/gpu-3" -> "alice"). Tokens named without
    one have no known operator; only their payout address separates them."""
    head, sep, _ = principal_name.partition("/")
    return head if sep and head else ""


class _Party(Protocol):
    @property
    def payout_address(self) -> str: ...

    @property
    def operator(self) -> str: ...


def independent(candidate: _Party, runs: Sequence[_Party]) -> bool:
    """Whether `candidate` shares neither payout address nor (known)
    operator with any run of the job so far."""
    for r in runs:
        if candidate.payout_address == r.payout_address:
            return False
        if candidate.operator and candidate.operator == r.operator:
            return False
    return True


def pick_at_random(candidates: Sequence[T]) -> T:
    """From the OS's CSPRNG: a miner cannot predict, or steer by its load,
    connection time or reputation, which of several it will be."""
    return candidates[secrets.randbelow(len(candidates))]
