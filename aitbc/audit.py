"""Audit events: what an operator must be able to reconstruct after the
fact — admin actions, token issuance and revocation, miner key registrations
and rotations, bans, refused settlements and refused callers. One line each,
`"audit": true`, at warning level so a quiet log level keeps them."""

from __future__ import annotations

from typing import Any

import structlog

_log = structlog.get_logger("audit")


def audit(event: str, **fields: Any) -> None:
    _log.warning(event, audit=True, **fields)
