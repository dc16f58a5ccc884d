"""Ed25519 keys and domain-separated signatures over exact bytes.

We sign bytes, not objects: protobuf parses several byte strings to the same
message, so a verifier that re-serialised before checking could be fooled.
The signed input is a length-prefixed encoding of (domain, body), so a
signature made for one purpose (a receipt) never verifies for another (a
settlement). PyNaCl (libsodium) is used because, unlike `cryptography`, it
refuses signatures under small-order public keys, and verifies about twice as
fast (see docs/DESIGN-NOTES.md).
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import nacl.bindings
import nacl.exceptions
import nacl.signing

from aitbc.errors import InvalidArgument

RECEIPT_DOMAIN = "aitbc/receipt/v1"
SETTLEMENT_DOMAIN = "aitbc/settlement/v1"
TRANSFER_DOMAIN = "aitbc/transfer/v1"
KEY_ROTATION_DOMAIN = "aitbc/key-rotation/v1"

PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64


def signing_input(domain: str, body: bytes) -> bytes:
    d = domain.encode()
    return len(d).to_bytes(4, "big") + d + len(body).to_bytes(8, "big") + body


def check_public_key(public_key: bytes, *, field: str = "public_key") -> bytes:
    """Refuse anything but a canonical, prime-order Ed25519 point.

    Small-order keys (the identity among them) let a forger produce
    signatures that verify for any message under lax verifiers.
    """
    if len(public_key) != PUBLIC_KEY_BYTES:
        raise InvalidArgument(
            f"public key must be {PUBLIC_KEY_BYTES} bytes, got {len(public_key)}",
            field=field,
            reason="BAD_PUBLIC_KEY",
        )
    if not nacl.bindings.crypto_core_ed25519_is_valid_point(public_key):
        raise InvalidArgument(
            "public key is not a valid Ed25519 point of prime order (small-order or non-canonical)",
            field=field,
            reason="BAD_PUBLIC_KEY",
        )
    return public_key


@functools.lru_cache(maxsize=4096)
def _valid_point(public_key: bytes) -> bool:
    # The point check costs as much as half a verification; the same few
    # keys (the coordinator's, each miner's) sign over and over.
    return bool(nacl.bindings.crypto_core_ed25519_is_valid_point(public_key))


def verify(domain: str, body: bytes, signature: bytes, public_key: bytes) -> bool:
    if len(signature) != SIGNATURE_BYTES or len(public_key) != PUBLIC_KEY_BYTES:
        return False
    if not _valid_point(public_key):
        return False
    try:
        nacl.signing.VerifyKey(public_key).verify(signing_input(domain, body), signature)
    except nacl.exceptions.BadSignatureError:
        return False
    return True


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


@dataclass(frozen=True)
class KeyPair:
    """An Ed25519 signing key. Holds the 32-byte seed; never logged."""

    seed: bytes

    @classmethod
    def generate(cls) -> KeyPair:
        return cls(bytes(nacl.signing.SigningKey.generate()))

    @property
    def public_key(self) -> bytes:
        return bytes(nacl.signing.SigningKey(self.seed).verify_key)

    def sign(self, domain: str, body: bytes) -> bytes:
        signed = nacl.signing.SigningKey(self.seed).sign(signing_input(domain, body))
        return bytes(signed.signature)

    def __repr__(self) -> str:
        return f"KeyPair(public_key={self.public_key.hex()})"


def load_or_create_key(path: Path) -> KeyPair:
    """Load a key file (hex seed), making one with mode 0600 if absent.

    Refuses a key file that others can read: a leaked key signs receipts
    (or settlements) in its owner's name.
    """
    path = Path(path)
    if path.exists():
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise PermissionError(f"key file {path} has mode {mode:o}; run: chmod 600 {path}")
        seed = bytes.fromhex(path.read_text().strip())
        if len(seed) != 32:
            raise ValueError(f"key file {path} does not hold a 32-byte hex seed")
        return KeyPair(seed)
    key = KeyPair.generate()
    save_key(path, key, exclusive=True)
    return key


def save_key(path: Path, key: KeyPair, *, exclusive: bool = False) -> None:
    """Write a key file readable by its owner only (mode 0600 from the start,
    never briefly world-readable). exclusive: fail if it exists."""
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(path, flags, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.seed.hex() + "\n")
