"""The result blobs on disk, and how long they and finished jobs are kept.

A result stays RESULT_RETENTION_DAYS after its job ended: the clock starts
when the client can first fetch it, not at submit. Then GetJobResult says
RESULT_EXPIRED, and the job's row stays until JOB_RETENTION_DAYS after the
end (GetJob, ListJobs, and the request id's dedupe), then it is deleted.
Both ages are read on the wall clock: they are days long and outlive
restarts, and a step of the clock moves them by the step, no more.

Blobs are content-addressed, so one file can be the output of several jobs.
A blob is deleted only when no job whose result is kept and no job still
in progress names it, and only once the file itself is older than the
retention: a job that writes the same output again renews the file, which
also covers another replica writing it into a shared BLOBS_DIR while this
one decides. Within this process a lock orders writing a blob against
deleting it, so a result stored while the sweep read the references is
never deleted from under its job.

Each pass handles one batch of each kind (jobs to expire, rows to delete,
old files to look at), so a backlog costs a few hundred rows a pass, not a
stall; files are looked at in name order from where the last pass stopped.
"""

from __future__ import annotations

import math
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

DAY = 86400.0
BATCH = 200
# A partial upload left by a crash (a live one grows with every chunk).
INCOMING_MAX_AGE = DAY
_DIGEST = re.compile(r"[0-9a-f]{64}")


@dataclass
class Scan:
    """What the blob folder holds, and up to a batch of old files."""

    bytes: int = 0
    count: int = 0
    old: list[str] = field(default_factory=list)


class BlobFiles:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock = threading.Lock()
        # digest -> time.monotonic() this process last wrote it.
        self._stored_at: dict[str, float] = {}
        self._cursor = ""

    def put(self, upload: Path, digest: str) -> Path:
        """Move a checked upload into place (on a worker thread)."""
        dest = self.root / digest
        with self._lock:
            self._stored_at[digest] = time.monotonic()
            upload.replace(dest)
        return dest

    def scan(self, older_than: float, limit: int) -> Scan:
        """Count every blob; list up to `limit` modified before `older_than`
        (wall clock), in name order from where the last scan stopped."""
        scan = Scan()
        old: list[str] = []
        with os.scandir(self.root) as entries:
            for entry in entries:
                if not _DIGEST.fullmatch(entry.name):
                    continue  # incoming/, and anything not ours
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                scan.bytes += st.st_size
                scan.count += 1
                if st.st_mtime < older_than:
                    old.append(entry.name)
        old.sort()
        after = [d for d in old if d > self._cursor]
        scan.old = (after or old)[:limit]
        self._cursor = scan.old[-1] if len(scan.old) == limit else ""
        return scan

    def delete(self, digests: list[str], refs_read_at: float, older_than: float) -> tuple[int, int]:
        """Delete these blobs, which no job named when the references were
        read (at `refs_read_at`, monotonic), except one this process wrote
        since or one whose file is younger than `older_than` (wall clock).
        Returns (files, bytes) deleted."""
        files = size = 0
        with self._lock:
            for digest in digests:
                if self._stored_at.get(digest, -math.inf) >= refs_read_at:
                    continue
                path = self.root / digest
                try:
                    st = path.stat()
                    if st.st_mtime >= older_than:
                        continue
                    path.unlink()
                except FileNotFoundError:
                    continue
                files += 1
                size += st.st_size
            for digest in [d for d, at in self._stored_at.items() if at < refs_read_at - DAY]:
                del self._stored_at[digest]
        return files, size

    def sweep_incoming(self, now: float) -> int:
        """Delete uploads nobody has written to for a day: a crash's."""
        gone = 0
        incoming = self.root / "incoming"
        with os.scandir(incoming) as entries:
            for entry in entries:
                try:
                    if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < now - INCOMING_MAX_AGE:
                        os.unlink(entry.path)
                        gone += 1
                except FileNotFoundError:
                    continue
        return gone
