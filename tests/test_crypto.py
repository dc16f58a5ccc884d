from __future__ import annotations

import os
from pathlib import Path

import pytest

from aitbc import crypto
from aitbc.addresses import address_of, check_address
from aitbc.errors import InvalidArgument
from aitbc.signed import BadSignature, open_signed, seal
from aitbc.v1 import signing_pb2

# Encodings of small-order points: the identity, the order-2 point, and
# order-4/8 points. A lax verifier accepts forged signatures under these.
SMALL_ORDER_KEYS = [
    bytes(32),
    bytes([1]) + bytes(31),
    bytes.fromhex("ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
    bytes.fromhex("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a"),
    bytes.fromhex("26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05"),
]


def test_signature_round_trip_and_domain_separation() -> None:
    key = crypto.KeyPair.generate()
    sig = key.sign(crypto.RECEIPT_DOMAIN, b"body")
    assert crypto.verify(crypto.RECEIPT_DOMAIN, b"body", sig, key.public_key)
    # The same bytes signed for receipts are no settlement.
    assert not crypto.verify(crypto.SETTLEMENT_DOMAIN, b"body", sig, key.public_key)
    assert not crypto.verify(crypto.RECEIPT_DOMAIN, b"bodY", sig, key.public_key)
    assert not crypto.verify(crypto.RECEIPT_DOMAIN, b"body", sig, crypto.KeyPair.generate().public_key)


def test_length_prefix_prevents_boundary_shifts() -> None:
    assert crypto.signing_input("ab", b"c") != crypto.signing_input("a", b"bc")


@pytest.mark.parametrize("key", SMALL_ORDER_KEYS)
def test_small_order_keys_are_refused(key: bytes) -> None:
    with pytest.raises(InvalidArgument) as err:
        crypto.check_public_key(key)
    assert err.value.reason == "BAD_PUBLIC_KEY"
    # And nothing verifies under them, not even the classic all-zero forgery.
    assert not crypto.verify(crypto.RECEIPT_DOMAIN, b"x", bytes(64), key)


def test_wrong_length_key_refused() -> None:
    with pytest.raises(InvalidArgument):
        crypto.check_public_key(bytes(31))


def test_every_flipped_byte_of_a_sealed_receipt_is_refused() -> None:
    key = crypto.KeyPair.generate()
    signed = seal(signing_pb2.ReceiptBody(job_id="job_1", nonce=os.urandom(16)), crypto.RECEIPT_DOMAIN, key)
    assert open_signed(signed, crypto.RECEIPT_DOMAIN, key.public_key, signing_pb2.ReceiptBody).job_id == "job_1"
    for field in ("body", "signature"):
        raw = getattr(signed, field)
        for i in range(len(raw)):
            bad = signing_pb2.Signed()
            bad.CopyFrom(signed)
            flipped = bytearray(raw)
            flipped[i] ^= 0x01
            setattr(bad, field, bytes(flipped))
            with pytest.raises(BadSignature):
                open_signed(bad, crypto.RECEIPT_DOMAIN, key.public_key, signing_pb2.ReceiptBody)


def test_non_canonical_body_is_refused_even_when_signed() -> None:
    key = crypto.KeyPair.generate()
    body = signing_pb2.ReceiptBody(job_id="job_1").SerializeToString(deterministic=True)
    # The same field twice parses to the same message, and an unknown
    # field parses too; both are refused because they are not canonical.
    for variant in (body + body, body + b"\xf8\x07\x01"):
        signed = signing_pb2.Signed(
            body=variant, signature=key.sign(crypto.RECEIPT_DOMAIN, variant), public_key=key.public_key
        )
        with pytest.raises(BadSignature, match="canonical"):
            open_signed(signed, crypto.RECEIPT_DOMAIN, key.public_key, signing_pb2.ReceiptBody)


def test_signed_by_another_key_is_refused() -> None:
    key, other = crypto.KeyPair.generate(), crypto.KeyPair.generate()
    signed = seal(signing_pb2.ReceiptBody(job_id="j"), crypto.RECEIPT_DOMAIN, other)
    with pytest.raises(BadSignature, match="other than the one registered"):
        open_signed(signed, crypto.RECEIPT_DOMAIN, key.public_key, signing_pb2.ReceiptBody)


def test_address_checksum_catches_typos() -> None:
    address = address_of(crypto.KeyPair.generate().public_key)
    assert check_address(address) == address
    body = address[4:]
    alphabet = "abcdefghijklmnopqrstuvwxyz234567"
    for i in range(len(body)):
        for replacement in alphabet.replace(body[i], ""):
            typo = "ait_" + body[:i] + replacement + body[i + 1 :]
            with pytest.raises(InvalidArgument):
                check_address(typo)
    for bad in ("", "ait_", "btc_" + body, address.upper(), address + "a"):
        with pytest.raises(InvalidArgument):
            check_address(bad)


def test_key_file_is_private_and_refused_when_readable(tmp_path: Path) -> None:
    path = tmp_path / "k" / "miner.key"
    key = crypto.load_or_create_key(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert crypto.load_or_create_key(path) == key
    path.chmod(0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        crypto.load_or_create_key(path)
