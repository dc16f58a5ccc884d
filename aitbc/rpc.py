"""Client-side helpers: channels and reading rich errors."""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc
from google.rpc import error_details_pb2, status_pb2

if TYPE_CHECKING:
    from aitbc.tls import TlsConfig

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


def insecure_channel(target: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(normalize_target(target), options=CLIENT_OPTIONS)


def channel(target: str, tls: TlsConfig | None = None) -> grpc.aio.Channel:
    """TLS (mutual when tls has a certificate) where tls names a CA, else
    plaintext."""
    creds = tls.channel_credentials() if tls is not None else None
    if creds is None:
        return insecure_channel(target)
    return grpc.aio.secure_channel(normalize_target(target), creds, options=CLIENT_OPTIONS)


def normalize_target(url: str) -> str:
    """Accept the seed's COORD_URL style ("http://host:port") as a target."""
    for scheme in ("grpc://", "http://"):
        if url.startswith(scheme):
            return url[len(scheme) :].rstrip("/")
    return url


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
