"""Leases and run-time bounds on this process's monotonic clock.

The store keeps wall-clock deadlines (`lease_deadline`, `lease_bounds`):
they outlive the process and other replicas read them. But a wall clock
steps (NTP, an operator, a VM resumed): an hour back and no lease lapsed
for an hour; an hour forward and every lease lapsed at once. So the live
decisions are made here, on `time.monotonic()`:

- a lease renewed here (its miner heartbeats on a stream of this process)
  lapses `lease_secs` after its last renewal: a silent miner loses it;
- a lease whose miner's stream ended here (cut, not closed for cause) is
  kept for `grace_secs` from then, so a miner that reconnects keeps its
  work; past the grace it lapses;
- a lease learned from the store (after a restart, or held on another
  replica) counts as renewed whenever its stored deadline changes, since
  only its holder's heartbeats change it, and lapses once it has not
  changed for a lease and a grace: its holder, if alive, decides first.

A run-time bound is read from the store's wall-clock time once, when this
process first learns the lease, and kept as a monotonic deadline from then
on; a lease assigned here never goes through the wall clock at all. A clock
step can therefore only skew a bound written before the step and read after
it: across a restart or a hand-over between replicas, never in one process.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

# Who holds a lease, as this process sees it.
LOCAL = "local"  # on a miner stream here
GONE = "gone"  # its miner's stream here ended: waiting out the grace
REMOTE = "remote"  # on another replica's stream, or nobody's since a restart


@dataclass
class Lease:
    lease_id: str
    job_id: str
    miner_id: str
    holder: str
    # Monotonic: it lapses at `expires` unless renewed first, and is taken
    # back at `run_due` (REMOTE: a lease later) whatever its renewals.
    expires: float
    run_due: float
    # The stored lease_deadline last seen or written here: another value in
    # the store is a renewal by someone else.
    stored: float
    # When this process learned of it (monotonic).
    since: float


@dataclass(frozen=True)
class LeaseRow:
    """A live lease as the store holds it."""

    job_id: str
    lease_id: str
    miner_id: str
    lease_deadline: float  # wall clock
    run_deadline: float  # wall clock; 0 when the lease has no bound row


class LeaseClock:
    def __init__(
        self,
        lease_secs: float,
        grace_secs: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.lease_secs = lease_secs
        self.grace_secs = grace_secs
        self.now = clock
        self.wall = wall
        self._leases: dict[str, Lease] = {}
        # Ended here while a scan of the store was in flight: the scan must
        # not bring them back.
        self._ended: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._leases)

    def get(self, lease_id: str) -> Lease | None:
        return self._leases.get(lease_id)

    def to_wall(self, due: float) -> float:
        """A monotonic deadline as wall-clock time, for the store."""
        return self.wall() + (due - self.now())

    def from_wall(self, deadline: float) -> float:
        """A stored wall-clock deadline as a monotonic one, read once."""
        return self.now() + max(0.0, deadline - self.wall())

    def assigned(self, lease_id: str, job_id: str, miner_id: str, run_due: float, stored: float) -> None:
        now = self.now()
        self._leases[lease_id] = Lease(lease_id, job_id, miner_id, LOCAL, now + self.lease_secs, run_due, stored, now)

    def held(self, lease_id: str, job_id: str, miner_id: str, run_deadline: float, stored: float) -> float:
        """A reconnecting miner still holds the lease (its hello says so):
        renewed, on this process's stream. Returns its run-time bound; one
        this process already knew stands, wherever the wall clock went."""
        now = self.now()
        known = self._leases.get(lease_id)
        run_due = known.run_due if known is not None else self._bound(run_deadline, now)
        self._leases[lease_id] = Lease(
            lease_id, job_id, miner_id, LOCAL, now + self.lease_secs, run_due, stored, known.since if known else now
        )
        self._ended.pop(lease_id, None)
        return run_due

    def renewed(self, lease_ids: Iterable[str], stored: float | None) -> None:
        """Its miner heartbeated here; `stored` is the deadline written to
        the store with it, None when this heartbeat wrote none."""
        expires = self.now() + self.lease_secs
        for lease_id in lease_ids:
            lease = self._leases.get(lease_id)
            if lease is not None:
                lease.holder, lease.expires = LOCAL, expires
                if stored is not None:
                    lease.stored = stored

    def gone(self, lease_ids: Iterable[str]) -> None:
        """Its miner's stream here ended: the lease waits out the grace."""
        expires = self.now() + self.grace_secs
        for lease_id in lease_ids:
            lease = self._leases.get(lease_id)
            if lease is not None:
                lease.holder, lease.expires = GONE, expires

    def ended(self, lease_id: str) -> None:
        if self._leases.pop(lease_id, None) is not None:
            self._ended[lease_id] = self.now()

    def observe(self, rows: Iterable[LeaseRow], scan_started: float) -> None:
        """Reconcile with the store's live leases, read from `scan_started`
        (monotonic) on: learn the new ones, see renewals made elsewhere,
        forget those that ended."""
        now = self.now()
        seen = set()
        for row in rows:
            seen.add(row.lease_id)
            lease = self._leases.get(row.lease_id)
            if lease is None:
                if row.lease_id in self._ended:
                    continue  # ended here after the scan read it
                self._leases[row.lease_id] = Lease(
                    row.lease_id, row.job_id, row.miner_id, REMOTE,
                    now + self.lease_secs + self.grace_secs, self._bound(row.run_deadline, now),
                    row.lease_deadline, now,
                )  # fmt: skip
            elif row.lease_deadline != lease.stored:
                # Renewed by a heartbeat elsewhere: another replica holds it.
                lease.stored = row.lease_deadline
                if lease.holder != LOCAL:
                    lease.holder = REMOTE
                    lease.expires = max(lease.expires, now + self.lease_secs + self.grace_secs)
        for lease_id in [x for x, lease in self._leases.items() if x not in seen and lease.since < scan_started]:
            del self._leases[lease_id]
        for lease_id in [x for x, at in self._ended.items() if at < scan_started]:
            del self._ended[lease_id]

    def lapsed(self) -> list[Lease]:
        now = self.now()
        return [lease for lease in self._leases.values() if lease.expires <= now]

    def overrun(self) -> list[Lease]:
        """Past their run-time bound. A lease held on another replica is
        that one's to take back (it can tell the miner to cancel); here
        only a lease later, when that one is late or gone."""
        now = self.now()
        return [
            lease
            for lease in self._leases.values()
            if now >= lease.run_due + (self.lease_secs if lease.holder == REMOTE else 0.0)
        ]

    def _bound(self, run_deadline: float, now: float) -> float:
        # A lease without a bound row (from before bounds) gets none.
        return now + max(0.0, run_deadline - self.wall()) if run_deadline else float("inf")
