"""Timestamps: stores keep ISO-8601 UTC text; the contract uses Timestamp."""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp


def utcnow() -> datetime:
    return datetime.now(UTC)


def ts_from_datetime(dt: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(dt)
    return ts


def ts_from_iso(text: str) -> Timestamp:
    return ts_from_datetime(datetime.fromisoformat(text))


def ts_now() -> Timestamp:
    return ts_from_datetime(utcnow())


def duration(seconds: float) -> Duration:
    d = Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d
