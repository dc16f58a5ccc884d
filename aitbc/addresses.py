"""Account addresses: derived from an Ed25519 public key, with a checksum so
a mistyped address is refused instead of burning money.

Format: "ait_" + lowercase base32 (no padding) of
    payload = blake2b-160(public_key)
    check   = sha256("aitbc/address/v1" || payload)[:4]
    payload || check
"""

from __future__ import annotations

import base64
import hashlib

from aitbc.errors import InvalidArgument

PREFIX = "ait_"
_PAYLOAD = 20
_CHECK = 4


def _checksum(payload: bytes) -> bytes:
    return hashlib.sha256(b"aitbc/address/v1" + payload).digest()[:_CHECK]


def address_of(public_key: bytes) -> str:
    payload = hashlib.blake2b(public_key, digest_size=_PAYLOAD).digest()
    raw = payload + _checksum(payload)
    return PREFIX + base64.b32encode(raw).decode().rstrip("=").lower()


def check_address(address: str, *, field: str = "address") -> str:
    """Return the address if well-formed with a valid checksum, else raise."""
    if not address:
        raise InvalidArgument("address is required", field=field, reason="BAD_ADDRESS")
    if not address.startswith(PREFIX):
        raise InvalidArgument(f"address must start with {PREFIX!r}", field=field, reason="BAD_ADDRESS")
    body = address[len(PREFIX) :].upper()
    try:
        raw = base64.b32decode(body + "=" * (-len(body) % 8))
    except ValueError:
        raise InvalidArgument("address is not valid base32", field=field, reason="BAD_ADDRESS") from None
    if len(raw) != _PAYLOAD + _CHECK or _checksum(raw[:_PAYLOAD]) != raw[_PAYLOAD:]:
        raise InvalidArgument("address checksum does not match: check for a typo", field=field, reason="BAD_ADDRESS")
    # The last base32 character carries unused bits: two strings can decode
    # to the same bytes. Only the canonical one names the account.
    if address != PREFIX + base64.b32encode(raw).decode().rstrip("=").lower():
        raise InvalidArgument("address is not in canonical form", field=field, reason="BAD_ADDRESS")
    return address
