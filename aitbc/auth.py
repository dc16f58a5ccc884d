"""Principals, bearer tokens and the per-method role table.

Tokens are stored only as sha256 hashes. The role table is read from the
`allowed_roles` option on each RPC in the proto descriptors, so an RPC that
forgets to declare its roles is refused to everyone rather than open to all.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
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
    # For miners: the only miner id this token may speak for.
    miner_id: str = ""

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
                     "address": "ait_...", "miner_id": ""}]}
    """

    def __init__(self, entries: Mapping[str, Principal]) -> None:
        self._by_hash = dict(entries)

    @classmethod
    def load(cls, path: Path) -> TokenTable:
        data = json.loads(Path(path).read_text())
        entries: dict[str, Principal] = {}
        for item in data.get("principals", []):
            role = item["role"]
            if role not in ROLE_NAMES:
                raise ValueError(f"{path}: unknown role {role!r}")
            entries[item["token_sha256"]] = Principal(
                name=item["name"],
                role=role,
                address=item.get("address", ""),
                miner_id=item.get("miner_id", ""),
            )
        return cls(entries)

    @staticmethod
    def dump(path: Path, principals: Iterable[tuple[str, Principal]]) -> None:
        """Write (token, principal) pairs, keeping only the token hashes."""
        items = [{"token_sha256": hash_token(tok), **asdict(p)} for tok, p in principals]
        Path(path).write_text(json.dumps({"principals": items}, indent=2) + "\n")

    def lookup(self, token: str) -> Principal | None:
        return self._by_hash.get(hash_token(token))


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
