"""TLS and mutual TLS for every server and client, from three options every
service and the sidecar share:

  TLS_CERT, TLS_KEY  this process's certificate: served, and presented as a
                     client certificate when it calls another service;
  TLS_CA             the network's CA: servers then require client
                     certificates it signed (mutual TLS), clients verify
                     the server against it.

Without them a server speaks plaintext, which it allows on loopback only
unless ALLOW_PLAINTEXT is set: a coordinator exposed to the internet without
TLS is a start-up error, not a silent default."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from aitbc.config import Option, parse_bool


@dataclass(frozen=True)
class TlsConfig:
    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None

    @classmethod
    def from_config(cls, conf: dict[str, Any]) -> TlsConfig:
        def path(name: str) -> Path | None:
            return Path(conf[name]) if conf.get(name) else None

        tls = cls(path("TLS_CERT"), path("TLS_KEY"), path("TLS_CA"))
        if bool(tls.cert) != bool(tls.key):
            raise ValueError("TLS_CERT and TLS_KEY go together: set both or neither")
        for p in (tls.cert, tls.key, tls.ca):
            if p is not None and not p.is_file():
                raise ValueError(f"{p} does not exist")
        return tls

    @property
    def serves_tls(self) -> bool:
        return self.cert is not None

    def server_credentials(self) -> grpc.ServerCredentials:
        assert self.cert and self.key
        return grpc.ssl_server_credentials(
            [(self.key.read_bytes(), self.cert.read_bytes())],
            root_certificates=self.ca.read_bytes() if self.ca else None,
            require_client_auth=self.ca is not None,
        )

    def channel_credentials(self, *, system_roots: bool = False) -> grpc.ChannelCredentials | None:
        """None: plaintext (no CA to verify a server with). system_roots:
        without TLS_CA verify the server against the system's trusted roots
        (a coordinator with a public certificate, https://...)."""
        if self.ca is None and not system_roots:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca.read_bytes() if self.ca else None,
            private_key=self.key.read_bytes() if self.key else None,
            certificate_chain=self.cert.read_bytes() if self.cert else None,
        )


TLS_OPTIONS = [
    Option("TLS_CERT", str, "", "PEM certificate served (and presented to other services as a client)"),
    Option("TLS_KEY", str, "", "PEM private key of TLS_CERT"),
    Option("TLS_CA", str, "", "PEM CA of the network: servers require client certificates it signed"),
]
SERVER_TLS_OPTIONS = [
    *TLS_OPTIONS,
    Option("ALLOW_PLAINTEXT", parse_bool, False, "serve without TLS on an address other than loopback"),
]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_plaintext(host: str, tls: TlsConfig, allow: bool) -> None:
    if not tls.serves_tls and not is_loopback(host) and not allow:
        raise ValueError(
            f"refusing to serve plaintext on {host}: set TLS_CERT and TLS_KEY (make certs), "
            "or ALLOW_PLAINTEXT=true behind a TLS-terminating proxy"
        )
