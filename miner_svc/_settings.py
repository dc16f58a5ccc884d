"""The sidecar's configuration checked once, for `run` (a problem exits 78,
EX_CONFIG, which the unit does not restart) and for `doctor` (a problem is
a FAIL line): each check returns the sentence an owner needs, fix included."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from aitbc.addresses import check_address
from aitbc.errors import InvalidArgument
from aitbc.rpc import Endpoint, channel_credentials, check_client_plaintext, parse_endpoint
from aitbc.tls import TlsConfig

ACCEL_MODES = ("auto", "gpu", "cpu", "gpu-only")
# What example configs put where the token goes: ours, the seed guide's,
# and the usual suspects. A real token is never one of these.
_PLACEHOLDER = re.compile(
    r"(change[_-]?me.*|replace[_-].*|your[_-].*|<.*>|x{3,}|todo|fixme|token|secret|api[_-]?key|\.\.\.)",
    re.IGNORECASE,
)
ADDRESS_FORM = "ait_ followed by 39 lowercase letters and digits (as `aitbc address` prints it)"


@dataclass(frozen=True)
class Problem:
    what: str
    fix: str

    def __str__(self) -> str:
        return f"{self.what}: {self.fix}"


def api_key_problem(token: str) -> Problem | None:
    fix = "set API_KEY to the miner token the network's operator issued for this MINER_ID"
    if not token:
        return Problem("API_KEY is empty", fix)
    if _PLACEHOLDER.fullmatch(token.strip()):
        return Problem(f"API_KEY={token!r} is a placeholder, not a token", fix)
    return None


def wallet_problem(address: str) -> Problem | None:
    if not address:
        return None
    try:
        check_address(address, field="WALLET_ADDR")
    except InvalidArgument as exc:
        return Problem(
            f"WALLET_ADDR={address!r} is not an AIT address ({exc.message})",
            f"expected {ADDRESS_FORM}; or leave WALLET_ADDR empty to be paid to this miner's own key",
        )
    return None


def accel_problem(mode: str) -> Problem | None:
    if mode.lower() not in ACCEL_MODES:
        return Problem(
            f"ACCEL_MODE={mode!r} is not a mode",
            "use auto, gpu (the CPU when no GPU works), cpu, or gpu-only (refuse to run without a GPU)",
        )
    return None


GPU_ONLY_PROBLEM = Problem(
    "ACCEL_MODE=gpu-only but no GPU is usable",
    "check `nvidia-smi`, the NVIDIA driver, and that nvidia-ml-py can load libnvidia-ml.so; "
    "or set ACCEL_MODE=gpu (or auto) to run on the CPU meanwhile",
)


def endpoint(conf: dict[str, Any]) -> Endpoint:
    """COORD_URL parsed; ValueError says what is wrong and the forms taken."""
    try:
        return parse_endpoint(conf["COORD_URL"])
    except ValueError as exc:
        raise ValueError(f"COORD_URL: {exc}") from None


def link(conf: dict[str, Any]) -> tuple[Endpoint, TlsConfig]:
    """The coordinator's address and the TLS to reach it with, checked:
    files exist, no TLS_CA on an http:// URL, no token in clear off this
    host unless ALLOW_PLAINTEXT. ValueError names the fix."""
    ep = endpoint(conf)
    tls = TlsConfig.from_config(conf)
    check_client_plaintext(ep, tls, conf["ALLOW_PLAINTEXT"])
    return ep, tls


def problems(conf: dict[str, Any]) -> list[str]:
    """Everything `run` refuses to start with, before touching the disk."""
    checks = (api_key_problem(conf["API_KEY"]), wallet_problem(conf["WALLET_ADDR"]), accel_problem(conf["ACCEL_MODE"]))
    out = [str(p) for p in checks if p]
    try:
        link(conf)
    except ValueError as exc:
        out.append(str(exc))
    if not 0 < conf["VRAM_CAP_FRACTION"] <= 1:
        out.append(f"VRAM_CAP_FRACTION must be in (0, 1], not {conf['VRAM_CAP_FRACTION']}")
    if conf["DRAIN_SECS"] < 0:
        out.append(f"DRAIN_SECS must be 0 or more, not {conf['DRAIN_SECS']}")
    return out


def channel_kind(ep: Endpoint, tls: TlsConfig) -> str:
    """How the link to ep is protected, in words for logs and doctor."""
    if channel_credentials(ep, tls) is None:
        return "plaintext"
    roots = f"verified against {tls.ca}" if tls.ca else "verified against the system's trusted roots"
    return f"{'mutual TLS' if tls.cert else 'TLS'}, {roots}"
