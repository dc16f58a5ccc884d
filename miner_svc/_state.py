"""Where the sidecar keeps what must outlive it, and where it only works.

STATE_DIR (default /var/lib/aitbc; the unit's StateDirectory=) holds the
receipt key and the results that wait for delivery: losing the key locks
the miner out (the coordinator holds its public key) and pays nothing more
to an address only it controlled. WORK_DIR (default STATE_DIR/work, same
file system so a finished result moves into the spool by rename) is
scratch: job inputs and outputs being written, emptied at every start.

The seed guide put everything in WORK_DIR=/tmp/aitbc-work, which PrivateTmp=,
reboots and Debian's /tmp cleaning wipe; a key found there is moved into
STATE_DIR once, and a STATE_DIR or KEY_FILE under a temporary folder is
refused unless ALLOW_TMP_STATE says it is meant (a throwaway devnet)."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from aitbc.crypto import KeyPair, load_or_create_key, save_key

log = structlog.get_logger()

DEFAULT_STATE_DIR = Path("/var/lib/aitbc")
# The seed guide's WORK_DIR and this sidecar's default before STATE_DIR:
# where a key made by an older install is found.
LEGACY_WORK_DIR = Path("/tmp/aitbc-work")
KEY_NAME = "miner.key"
RESULTS_DIR = "results"


def temp_roots() -> list[Path]:
    """Folders the system empties on its own schedule."""
    roots = {Path("/tmp"), Path("/var/tmp"), Path("/dev/shm"), Path(tempfile.gettempdir())}
    return sorted({r.resolve() for r in roots})


def under_temp(path: Path) -> Path | None:
    """The temporary folder path lies in, if any (symlinks resolved)."""
    resolved = Path(path).expanduser().resolve()
    for root in temp_roots():
        if resolved == root or root in resolved.parents:
            return root
    return None


@dataclass(frozen=True)
class Layout:
    state_dir: Path
    work_dir: Path
    key_file: Path
    # WORK_DIR as configured (None: not set, the default under STATE_DIR).
    configured_work_dir: Path | None = None

    @classmethod
    def from_config(cls, conf: dict[str, Any]) -> Layout:
        state = Path(conf["STATE_DIR"]).expanduser()
        work = Path(conf["WORK_DIR"]).expanduser() if conf["WORK_DIR"] else None
        key = Path(conf["KEY_FILE"]).expanduser() if conf["KEY_FILE"] else state / KEY_NAME
        return cls(state, work or state / "work", key, work)

    @property
    def results_dir(self) -> Path:
        """Finished results, signed, waiting for the coordinator to take them."""
        return self.state_dir / RESULTS_DIR

    @property
    def jobs_dir(self) -> Path:
        return self.work_dir / "jobs"

    def legacy_key_files(self) -> list[Path]:
        """Where an older install kept the key: in WORK_DIR (the configured
        one, or the old default when none is configured)."""
        old = self.configured_work_dir or LEGACY_WORK_DIR
        return [p for p in (old / KEY_NAME,) if p != self.key_file]

    def temp_paths(self) -> list[tuple[str, Path, Path]]:
        """(option, path, temporary folder it lies in) for each option that
        would lose the key."""
        out = []
        for what, path in (("STATE_DIR", self.state_dir), ("KEY_FILE", self.key_file)):
            root = under_temp(path)
            if root is not None:
                out.append((what, path, root))
        return out

    def temp_problems(self) -> list[str]:
        """Why this layout would lose the key, as sentences naming the fix."""
        return [
            f"{what}={path} is under {root}, which reboots, PrivateTmp= and tmp cleaning empty: "
            f"the miner key would be lost and the coordinator would refuse this miner. "
            f"Set STATE_DIR to a lasting folder (default {DEFAULT_STATE_DIR}), "
            f"or ALLOW_TMP_STATE=true for a throwaway test network"
            for what, path, root in self.temp_paths()
        ]


class StateError(Exception):
    """A state directory the sidecar cannot use: the message names the fix."""


def prepare(layout: Layout, *, allow_temp: bool) -> None:
    """Make STATE_DIR and WORK_DIR (mode 0700) and bring an older install's
    key into STATE_DIR. Raises StateError."""
    problems = layout.temp_problems()
    if problems and not allow_temp:
        raise StateError("; ".join(problems))
    for what, path in (("STATE_DIR", layout.state_dir), ("WORK_DIR", layout.work_dir)):
        try:
            path.mkdir(parents=True, exist_ok=True)
            if path.stat().st_uid == os.geteuid():
                path.chmod(0o700)
        except OSError as exc:
            raise StateError(
                f"{what}={path}: {exc.strerror}: run the sidecar as the folder's owner "
                f"(sudo -u aitbc ...) or set {what} to a folder it may write"
            ) from None
    migrate_key(layout)


def migrate_key(layout: Layout) -> Path | None:
    """Move a key left in an old WORK_DIR to KEY_FILE, if KEY_FILE has none.
    Only a key file this user owns and nobody else can read is taken: a
    stranger's file in a shared /tmp is not our key."""
    if layout.key_file.exists():
        for old in layout.legacy_key_files():
            if old.exists():
                log.warning("stale_miner_key_ignored", path=str(old), using=str(layout.key_file))
        return None
    for old in layout.legacy_key_files():
        try:
            st = old.stat()
        except OSError:
            continue
        if st.st_uid != os.geteuid() or st.st_mode & 0o077:
            log.warning("foreign_miner_key_ignored", path=str(old), reason="not ours alone (owner or mode)")
            continue
        try:
            key = load_or_create_key(old)
        except (ValueError, OSError) as exc:
            log.warning("legacy_miner_key_unreadable", path=str(old), error=str(exc))
            continue
        save_key(layout.key_file, key, exclusive=True)
        _fsync(layout.key_file)
        old.unlink()
        log.warning(
            "miner_key_moved",
            source=str(old),
            destination=str(layout.key_file),
            public_key=key.public_key.hex(),
            why="WORK_DIR is scratch; the key lives in STATE_DIR, back it up",
        )
        return old
    return None


def load_key(layout: Layout) -> KeyPair:
    """The receipt key, made on first start. Raises StateError."""
    try:
        key = load_or_create_key(layout.key_file)
    except PermissionError as exc:
        raise StateError(str(exc)) from None
    except ValueError as exc:
        raise StateError(f"{exc}: restore it from your backup (see README, Lost miner key)") from None
    except OSError as exc:
        raise StateError(f"KEY_FILE={layout.key_file}: {exc.strerror}") from None
    _fsync(layout.key_file)
    return key


def _fsync(path: Path) -> None:
    # A key made just before a power cut must still be there after it: the
    # coordinator may already hold its public key.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
