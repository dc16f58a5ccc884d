"""Signed envelopes (receipts, settlements): make them, and open them only
after checking the signature on the exact bytes received.

A body must be in canonical encoding (what deterministic serialisation of
the parsed message gives back byte for byte), so unknown fields, duplicated
fields and other encodings of the same message are refused: a verifier
never acts on anything but what was signed.
"""

from __future__ import annotations

from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from aitbc import crypto
from aitbc.errors import InvalidArgument
from aitbc.v1 import signing_pb2
from aitbc.wellformed import check_fields

M = TypeVar("M", bound=Message)


class BadSignature(InvalidArgument):
    reason = "BAD_SIGNATURE"


def seal(message: Message, domain: str, key: crypto.KeyPair) -> signing_pb2.Signed:
    body = message.SerializeToString(deterministic=True)
    return signing_pb2.Signed(body=body, signature=key.sign(domain, body), public_key=key.public_key)


def open_signed(
    signed: signing_pb2.Signed, domain: str, expected_key: bytes | None, cls: type[M], name: str = "body"
) -> M:
    """The body, once its signature, encoding and fields (times in range, no
    NUL in a string; InvalidArgument naming `name.field`) are checked."""
    if expected_key is not None and signed.public_key != expected_key:
        raise BadSignature("signed by a key other than the one registered", field="public_key")
    if not crypto.verify(domain, signed.body, signed.signature, signed.public_key):
        raise BadSignature("signature does not verify", field="signature")
    msg = cls()
    try:
        msg.ParseFromString(signed.body)
    except DecodeError:
        raise BadSignature("signed body does not parse", field="body") from None
    # Deterministic serialisation keeps unknown fields, so drop them first:
    # a body carrying any then fails the comparison.
    msg.DiscardUnknownFields()
    if msg.SerializeToString(deterministic=True) != signed.body:
        raise BadSignature("signed body is not in canonical encoding (unknown or repeated fields)", field="body")
    # What the signer signed can still be what no handler should act on.
    check_fields(msg, f"{name}.")
    return msg
