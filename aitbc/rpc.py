"""Client-side helpers: channels and reading rich errors."""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2, status_pb2

from aitbc.tls import TlsConfig, is_loopback

TARGET_FORMS = "https://host[:port] (TLS, port 443 by default), http://host:port (plaintext) or host:port"

CLIENT_OPTIONS = [
    ("grpc.max_receive_message_length", 8 * 1024 * 1024),
    ("grpc.max_send_message_length", 8 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # A peer that restarts is found again within ~2 s, not grpc's default 2 min.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


@dataclass(frozen=True)
class Endpoint:
    """Where a service is and how to speak to it, from a URL as people
    write them (the seed guide's COORD_URL is "https://coordinator...")."""

    host: str
    port: int
    # "https": TLS, verified against TLS_CA or else the system's roots;
    # "http": plaintext; "": bare host:port, TLS exactly when TLS_CA is set.
    scheme: str

    @property
    def target(self) -> str:
        """The gRPC target: host:port, an IPv6 host in brackets."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.scheme}://{self.target}" if self.scheme else self.target


def parse_endpoint(url: str) -> Endpoint:
    """Parse https://host[:port], http://host:port (grpc:// is the same) or
    host:port; raise ValueError naming the accepted forms otherwise."""
    text = url.strip()
    scheme, sep, _ = text.partition("://")
    scheme = scheme.lower() if sep else ""
    if scheme == "grpc":
        scheme = "http"
    if scheme not in ("", "http", "https"):
        raise ValueError(f"{url!r}: unknown scheme {scheme!r}; use {TARGET_FORMS}")
    try:
        parts = urllib.parse.urlsplit(text if sep else "//" + text)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"{url!r}: {exc}; use {TARGET_FORMS}") from None
    host = parts.hostname or ""
    if not host:
        raise ValueError(f"{url!r} names no host; use {TARGET_FORMS}")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(f"{url!r}: gRPC takes a host and a port, no path, query or user; use {TARGET_FORMS}")
    if port is None:
        if scheme == "https":
            port = 443
        elif scheme == "http":
            port = 80
        else:
            raise ValueError(f"{url!r} has no port; use {TARGET_FORMS}")
    if port == 0:
        raise ValueError(f"{url!r}: port 0 is not a port to connect to; use {TARGET_FORMS}")
    return Endpoint(host, port, scheme)


def channel_credentials(endpoint: Endpoint, tls: TlsConfig | None) -> grpc.ChannelCredentials | None:
    """TLS credentials for the endpoint, or None for plaintext."""
    tls = tls or TlsConfig()
    if endpoint.scheme == "https":
        return tls.channel_credentials(system_roots=True)
    if endpoint.scheme == "http":
        if tls.ca is not None:
            raise ValueError(f"{endpoint} is plaintext but TLS_CA is set: write https://{endpoint.target}")
        return None
    return tls.channel_credentials()


def check_client_plaintext(endpoint: Endpoint, tls: TlsConfig | None, allow: bool) -> None:
    """A bearer token sent in clear off this host is a token given away:
    plaintext is for loopback unless allowed (a private network)."""
    if channel_credentials(endpoint, tls) is None and not is_loopback(endpoint.host) and not allow:
        raise ValueError(
            f"refusing to send the token in plaintext to {endpoint}: write https://{endpoint.host} "
            f"(or https://{endpoint.target}) for TLS, or set ALLOW_PLAINTEXT=true on a network you trust"
        )


def insecure_channel(target: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(parse_endpoint(target).target, options=CLIENT_OPTIONS)


def channel(target: str, tls: TlsConfig | None = None) -> grpc.aio.Channel:
    """A channel to target (any form parse_endpoint takes): TLS for
    https:// (verified against tls.ca, else the system's roots) and for
    host:port when tls names a CA; mutual when tls has a certificate;
    plaintext otherwise."""
    endpoint = parse_endpoint(target)
    creds = channel_credentials(endpoint, tls)
    if creds is None:
        return grpc.aio.insecure_channel(endpoint.target, options=CLIENT_OPTIONS)
    return grpc.aio.secure_channel(endpoint.target, creds, options=CLIENT_OPTIONS)


def normalize_target(url: str) -> str:
    """The gRPC target (host:port) of any form parse_endpoint takes."""
    return parse_endpoint(url).target


def retry_after(err: grpc.aio.AioRpcError) -> float | None:
    """The RetryInfo delay of a failed call in seconds: the service said
    the same call may succeed then. None if it said nothing of the kind."""
    for key, value in err.trailing_metadata() or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            for detail in status_pb2.Status.FromString(value).details:
                if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                    info = error_details_pb2.RetryInfo()
                    detail.Unpack(info)
                    return float(info.retry_delay.ToTimedelta().total_seconds())
    return None


def error_reason(err: grpc.aio.AioRpcError) -> str:
    """The ErrorInfo reason of a failed call, or "" if it has none."""
    for key, value in err.trailing_metadata() or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    detail.Unpack(info)
                    return str(info.reason)
    return ""
