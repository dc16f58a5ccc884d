"""What every request passes before its handler runs, in every service:
unknown fields are dropped, and each Timestamp and Duration in it must be
one protobuf's own conversions accept; no string holds a NUL.

Unknown fields would otherwise be kept, stored and sent on (a job spec
padded with megabytes of them was stored and re-read at every dispatch).
The conversions (ToNanoseconds, ToDatetime, ToJsonString) raise ValueError
on a time outside years 1..9999 or nanos outside [0, 1e9), which a handler
would answer with INTERNAL; here the field is named instead.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
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
def _needs_walk(desc: Descriptor) -> bool:
    """Whether a message of this type can hold a Timestamp, a Duration or a
    string at any depth: those that cannot are not walked."""
    seen: set[str] = set()
    todo = [desc]
    while todo:
        d = todo.pop()
        if d.full_name in (TIMESTAMP, DURATION):
            return True
        if d.full_name in seen:
            continue
        seen.add(d.full_name)
        if any(f.type == FieldDescriptor.TYPE_STRING for f in d.fields):
            return True
        todo += [f.message_type for f in d.fields if f.message_type is not None]
    return False


def _check_text(text: str, field: str) -> None:
    # PostgreSQL text cannot hold NUL (the write fails deep in a handler),
    # and no name, id or address here has a use for one.
    if "\x00" in text:
        raise InvalidArgument(f"{field} must not contain a NUL character", field=field)


def check_fields(msg: Message, prefix: str = "") -> None:
    """Every Timestamp, Duration and string set in `msg`, at any depth,
    named by its path ("spec.deadline_time") when it is out of range."""
    if not _needs_walk(msg.DESCRIPTOR):
        return
    for f, value in msg.ListFields():
        name = f"{prefix}{f.name}"
        if f.type == FieldDescriptor.TYPE_STRING:
            for i, text in enumerate(value) if f.is_repeated else ((None, value),):
                _check_text(text, name if i is None else f"{name}[{i}]")
            continue
        if f.message_type is None or not _needs_walk(f.message_type):
            continue
        if f.is_repeated and f.message_type.GetOptions().map_entry:
            key_f, value_f = f.message_type.fields_by_name["key"], f.message_type.fields_by_name["value"]
            for k in value:
                if key_f.type == FieldDescriptor.TYPE_STRING:
                    _check_text(k, f"{name} key")
                if value_f.type == FieldDescriptor.TYPE_STRING:
                    _check_text(value[k], f"{name}[{k!r}]")
            items = [] if value_f.message_type is None else [(f"{name}[{k!r}]", v) for k, v in value.items()]
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
                check_fields(item, f"{path}.")


def well_formed(request: Message) -> Message:
    """The request, without unknown fields, its times checked and no NUL in
    its strings."""
    request.DiscardUnknownFields()
    check_fields(request)
    return request
