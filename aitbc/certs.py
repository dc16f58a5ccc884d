"""`make certs` (python -m aitbc.certs DIR [HOST...]): a development CA and
one node certificate it signs, good for serving TLS and for presenting as
a client (mutual TLS) — enough to run every service and sidecar of a test
network with TLS_CA, TLS_CERT and TLS_KEY pointing here.

A production network keeps its CA key offline and issues one certificate
per host; this makes the same files with one command, for trying it out."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import socket
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_ca(folder: Path, name: str = "AITBC dev CA") -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(key, hashes.SHA256())
    )
    _write(folder / "ca.pem", cert.public_bytes(serialization.Encoding.PEM), 0o644)
    _write(folder / "ca.key", _key_pem(key), 0o600)
    return cert, key


def make_node(
    folder: Path, ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, hosts: list[str], name: str = "node"
) -> None:
    """`name`.pem and `name`.key: a certificate for `hosts` (DNS names or IP
    addresses) usable as server and as client."""
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=90))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write(folder / f"{name}.pem", cert.public_bytes(serialization.Encoding.PEM), 0o644)
    _write(folder / f"{name}.key", _key_pem(key), 0o600)


def make_dev_certs(folder: Path, hosts: list[str] | None = None) -> Path:
    hosts = hosts or ["localhost", "127.0.0.1", socket.gethostname()]
    ca, ca_key = make_ca(folder)
    make_node(folder, ca, ca_key, hosts)
    return folder


def main(argv: list[str]) -> int:
    folder = Path(argv[0]) if argv else Path("var/certs")
    make_dev_certs(folder, argv[1:] or None)
    print(f"wrote {folder}/ca.pem, ca.key (keep it secret), node.pem, node.key")
    print(f"serve and connect with: --tls-ca {folder}/ca.pem --tls-cert {folder}/node.pem --tls-key {folder}/node.key")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
