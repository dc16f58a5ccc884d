"""What every request passes before its handler runs, in every service:
unknown fields are dropped, and each Timestamp and Duration in it must be
one protobuf's own conversions accept.

Unknown fields would otherwise be kept, stored and sent on (a job spec
padded with megabytes of them was stored and re-read at every dispatch).
The conversions (ToNanoseconds, ToDatetime, ToJsonString) raise ValueError
on a time outside years 1..9999 or nanos outside [0, 1e9), which a handler
would answer with INTERNAL; here the field is named instead.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from google.protobuf.descriptor import Descriptor
from google.protobuf.message import Message

from aitbc.errors import InvalidArgument

TIMESTAMP = "google.protobuf.Timestamp"
DURATION = "google.protobuf.Duration"
# 0001-01-01T00:00:00Z and 9999-12-31T23:59:59Z, the range of Timestamp.
TIMESTAMP_MIN_SECONDS = -62_135_596_800
TIMESTAMP_MAX_SECONDS = 253_402_300_799
# About 10,000 years, the range of Duration.
DURATION_MAX_SECONDS = 315_576_000_000
NANOS = 1_000_000_000


def check_timestamp(ts: Any, field: str) -> None:
    if not TIMESTAMP_MIN_SECONDS <= ts.seconds <= TIMESTAMP_MAX_SECONDS:
        raise InvalidArgument(f"{field} must be a time in years 1..9999, got {ts.seconds} seconds", field=field)
    if not 0 <= ts.nanos < NANOS:
        raise InvalidArgument(f"{field}.nanos must be in [0, 1e9), got {ts.nanos}", field=field)


def check_duration(d: Any, field: str) -> None:
    """Durations here are spans of work or time to wait: never negative."""
    if not 0 <= d.seconds <= DURATION_MAX_SECONDS:
        raise InvalidArgument(f"{field} must be 0..{DURATION_MAX_SECONDS} seconds, got {d.seconds}", field=field)
    if not 0 <= d.nanos < NANOS:
        raise InvalidArgument(f"{field}.nanos must be in [0, 1e9), got {d.nanos}", field=field)


@cache
def _holds_times(desc: Descriptor) -> bool:
    """Whether a message of this type can hold a Timestamp or Duration at
    any depth: most requests cannot, and are not walked."""
    seen: set[str] = set()
    todo = [desc]
    while todo:
        d = todo.pop()
        if d.full_name in (TIMESTAMP, DURATION):
            return True
        if d.full_name in seen:
            continue
        seen.add(d.full_name)
        todo += [f.message_type for f in d.fields if f.message_type is not None]
    return False


def check_times(msg: Message, prefix: str = "") -> None:
    """Every Timestamp and Duration set in `msg`, at any depth, named by its
    path ("spec.deadline_time") when it is out of range."""
    if not _holds_times(msg.DESCRIPTOR):
        return
    for f, value in msg.ListFields():
        if f.message_type is None or not _holds_times(f.message_type):
            continue
        name = f"{prefix}{f.name}"
        if f.is_repeated and f.message_type.GetOptions().map_entry:
            scalar = f.message_type.fields_by_name["value"].message_type is None
            items = [] if scalar else [(f"{name}[{k!r}]", v) for k, v in value.items()]
        elif f.is_repeated:
            items = [(f"{name}[{i}]", v) for i, v in enumerate(value)]
        else:
            items = [(name, value)]
        for path, item in items:
            kind = item.DESCRIPTOR.full_name
            if kind == TIMESTAMP:
                check_timestamp(item, path)
            elif kind == DURATION:
                check_duration(item, path)
            else:
                check_times(item, f"{path}.")


def well_formed(request: Message) -> Message:
    """The request, without unknown fields and with its times checked."""
    request.DiscardUnknownFields()
    check_times(request)
    return request
