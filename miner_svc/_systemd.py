"""sd_notify(3): tell systemd how long the drain may take.

The protocol is one datagram on the socket named by $NOTIFY_SOCKET, declared
stable for reimplementation in systemd's own man page; the Python packages
for it are unmaintained (sdnotify, last released 2017) or need libsystemd to
build, so these few lines stand in for them."""

from __future__ import annotations

import os
import socket

import structlog

log = structlog.get_logger()

# Beyond DRAIN_SECS: delivering the last results, stopping the workers.
STOP_MARGIN_SECS = 30.0


def notify(message: str) -> bool:
    """Send message to the service manager; False when there is none (not
    run by systemd, or NotifyAccess= does not admit us)."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        log.warning("sd_notify_failed", error=str(exc))
        return False
    return True


def stopping(drain_secs: float) -> bool:
    """On SIGTERM: systemd waits DRAIN_SECS plus a margin from now instead of
    its TimeoutStopSec=, so raising DRAIN_SECS alone is enough."""
    usec = int((drain_secs + STOP_MARGIN_SECS) * 1_000_000)
    return notify(f"STOPPING=1\nEXTEND_TIMEOUT_USEC={usec}\nSTATUS=draining: running jobs may finish")
