"""Principals, bearer tokens and the per-method role table.

Tokens are stored only as sha256 hashes. The role table is read from the
`allowed_roles` option on each RPC in the proto descriptors, so an RPC that
forgets to declare its roles is refused to everyone rather than open to all.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import os
import secrets
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from google.protobuf.descriptor import ServiceDescriptor

from aitbc.v1 import options_pb2

ROLE_NAMES = {
    "client": options_pb2.ROLE_CLIENT,
    "miner": options_pb2.ROLE_MINER,
    "admin": options_pb2.ROLE_ADMIN,
    "coordinator": options_pb2.ROLE_COORDINATOR,
}

# Health and reflection are answered for anyone: load balancers and grpcurl
# need them before they hold a token.
PUBLIC_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)


@dataclass(frozen=True)
class Principal:
    name: str
    role: str
    # Wallet address the principal pays from (client) or is paid to (miner).
    address: str = ""
    # For miners: the one miner id this token speaks for. A miner token
    # that names none is refused at Connect and RotateKey (fail closed).
    miner_id: str = ""
    # Epoch seconds after which the token is refused; 0: never.
    expires: float = 0.0

    @property
    def expired(self) -> bool:
        return bool(self.expires) and time.time() >= self.expires

    @property
    def role_value(self) -> int:
        return ROLE_NAMES[self.role]


current_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("current_principal", default=None)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return "ait_tok_" + secrets.token_urlsafe(32)


class TokenTable:
    """Maps token hashes to principals. Loaded from a JSON file:

    {"principals": [{"token_sha256": "...", "name": "...", "role": "client",
                     "address": "ait_...", "miner_id": "", "expires": 0}]}

    A table loaded from a file follows it: tokens issued or revoked with
    `python -m aitbc.tokens` take effect within a second, without a restart.
    A file that no longer parses is logged and the last good table kept.
    """

    RELOAD_SECS = 1.0

    def __init__(self, entries: Mapping[str, Principal], path: Path | None = None) -> None:
        self._by_hash = dict(entries)
        self._path = path
        self._stamp = _stamp(path) if path else None
        self._checked = time.monotonic()
        self._lock = threading.Lock()

    @classmethod
    def load(cls, path: Path) -> TokenTable:
        return cls(read_principals(Path(path)), Path(path))

    @staticmethod
    def dump(path: Path, principals: Iterable[tuple[str, Principal]]) -> None:
        """Write (token, principal) pairs, keeping only the token hashes."""
        write_principals(Path(path), {hash_token(tok): p for tok, p in principals})

    def lookup(self, token: str) -> Principal | None:
        self._maybe_reload()
        return self._by_hash.get(hash_token(token))

    def lookup_hash(self, token_sha256: str, *, fresh: bool = False) -> Principal | None:
        """The principal of a token by its hash, for a caller that keeps
        checking a token it admitted earlier (an open stream). `fresh` looks
        at the file now rather than within RELOAD_SECS: one stat, for the
        moments a revocation must not be missed (a result about to be paid)."""
        self._maybe_reload(force=fresh)
        return self._by_hash.get(token_sha256)

    def speaks_for_miner(self, miner_id: str) -> bool:
        """Whether a live miner token names this miner id, looking at the
        file now: a run held for agreement is paid only if one does."""
        self._maybe_reload(force=True)
        return any(p.role == "miner" and p.miner_id == miner_id and not p.expired for p in self._by_hash.values())

    def _maybe_reload(self, *, force: bool = False) -> None:
        if self._path is None or (not force and time.monotonic() - self._checked < self.RELOAD_SECS):
            return
        with self._lock:
            self._checked = time.monotonic()
            stamp = _stamp(self._path)
            if stamp == self._stamp:
                return
            try:
                self._by_hash = read_principals(self._path)
            except (OSError, ValueError, KeyError) as exc:
                import structlog

                structlog.get_logger().error("tokens_file_unreadable", path=str(self._path), error=str(exc))
            self._stamp = stamp


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


_FIELDS = {f.name for f in fields(Principal)}


def read_principals(path: Path) -> dict[str, Principal]:
    data = json.loads(path.read_text())
    entries: dict[str, Principal] = {}
    # A miner id belongs to one name: tokens of two names for one id would
    # let either register its key and lock the other out.
    owners: dict[str, str] = {}
    for item in data.get("principals", []):
        if item["role"] not in ROLE_NAMES:
            raise ValueError(f"{path}: unknown role {item['role']!r}")
        p = Principal(**{k: v for k, v in item.items() if k in _FIELDS})
        if not isinstance(p.miner_id, str):
            raise ValueError(f"{path}: {p.name}'s miner_id must be one miner id, a string")
        if p.miner_id and owners.setdefault(p.miner_id, p.name) != p.name:
            raise ValueError(f"{path}: miner id {p.miner_id!r} is claimed by {owners[p.miner_id]!r} and {p.name!r}")
        entries[item["token_sha256"]] = p
    return entries


def write_principals(path: Path, entries: Mapping[str, Principal]) -> None:
    """Atomically, mode 0600: the file names every identity on the network."""
    items = [{"token_sha256": h, **asdict(p)} for h, p in entries.items()]
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps({"principals": items}, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def role_table(services: Iterable[ServiceDescriptor]) -> dict[str, frozenset[int]]:
    """Full method path -> allowed role values, from the descriptors."""
    table: dict[str, frozenset[int]] = {}
    for service in services:
        for method in service.methods:
            roles = method.GetOptions().Extensions[options_pb2.allowed_roles]
            table[f"/{service.full_name}/{method.name}"] = frozenset(
                r for r in roles if r != options_pb2.ROLE_UNSPECIFIED
            )
    return table


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token:
                return token.strip()
    return None


def auth_metadata(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)
