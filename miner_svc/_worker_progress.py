"""Progress reports from a workload inside a worker process to its slot."""

from __future__ import annotations

import time
from multiprocessing.connection import Connection

# Set by the worker process's main loop; None anywhere else.
connection: Connection | None = None
EVERY_SECS = 0.25
_last = 0.0


def report_progress(fraction: float, message: str = "") -> None:
    """Tell the sidecar how far the job has come; a no-op outside a worker.
    At most four reports a second (and always the last one)."""
    global _last
    now = time.monotonic()
    if connection is None or (now - _last < EVERY_SECS and fraction < 1.0):
        return
    _last = now
    connection.send(("progress", max(0.0, min(1.0, fraction)), message))
