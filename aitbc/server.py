"""gRPC server plumbing shared by every service: auth and error mapping in one
interceptor, health, reflection, graceful shutdown, a ready file for
supervisors and tests."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import structlog
from google.protobuf import any_pb2
from google.protobuf.descriptor import ServiceDescriptor
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status

from aitbc.audit import audit
from aitbc.auth import PUBLIC_SERVICES, Principal, TokenTable, bearer_token, current_principal, role_table
from aitbc.config import Option
from aitbc.errors import DOMAIN, AitbcError, InvalidArgument, PermissionDenied, ResourceExhausted, Unauthenticated
from aitbc.metrics import RPC_REQUESTS, RPC_SECONDS
from aitbc.tls import SERVER_TLS_OPTIONS, TlsConfig, check_plaintext
from aitbc.wellformed import well_formed

log = structlog.get_logger()

MAX_MESSAGE_BYTES = 4 * 1024 * 1024 + 64 * 1024
# A refused client stream waits this long for the caller's first message
# (see _Gate.before_refusing), and at most this many wait at once.
REFUSAL_WAIT_SECS = 1.0
MAX_WAITING_REFUSALS = 256
# Messages a stream refused midway may still send while it is waited for.
MAX_DRAINED = 256


def rich_status(err: AitbcError) -> grpc.Status:
    info = error_details_pb2.ErrorInfo(reason=err.reason, domain=DOMAIN, metadata=err.metadata)
    details = [_pack(info)]
    if err.code == "INVALID_ARGUMENT" and err.field:
        bad = error_details_pb2.BadRequest(
            field_violations=[error_details_pb2.BadRequest.FieldViolation(field=err.field, description=err.message)]
        )
        details.append(_pack(bad))
    retry_after = getattr(err, "retry_after", 0.0)
    if retry_after:
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromMilliseconds(max(1, int(retry_after * 1000)))
        details.append(_pack(retry))
    st = status_pb2.Status(code=getattr(code_pb2, err.code), message=err.message, details=details)
    return rpc_status.to_status(st)


def _pack(msg: Any) -> any_pb2.Any:
    a = any_pb2.Any()
    a.Pack(msg)
    return a


async def _abort(context: grpc.aio.ServicerContext, err: AitbcError) -> None:
    status = rich_status(err)
    await context.abort(status.code, status.details, status.trailing_metadata)


@dataclass(frozen=True)
class Limits:
    """What one identity may use of a server. The coordinator's service
    identity is not rate limited: it speaks for every client's jobs."""

    # Calls per second per identity, by role; bursts of twice that.
    rate_per_sec: Mapping[str, float] = field(
        default_factory=lambda: {"client": 50.0, "miner": 50.0, "admin": 100.0, "coordinator": 0.0}
    )
    # Streams (WatchJob, GetJobResult, Connect) one identity holds open at once.
    streams_per_identity: int = 64


SERVER_OPTIONS = [
    *SERVER_TLS_OPTIONS,
    Option(
        "RATE_LIMITS",
        str,
        "client=50,miner=50,admin=100",
        "calls per second per identity, by role (bursts of twice that); 0 or absent: unlimited",
    ),
    Option("STREAMS_PER_IDENTITY", int, 64, "streams one identity may hold open at once"),
]


def server_settings(conf: Mapping[str, Any]) -> tuple[TlsConfig, Limits]:
    """TLS and limits from a service's config; raises ValueError saying
    what is wrong (bad values, plaintext off loopback)."""
    tls = TlsConfig.from_config(dict(conf))
    check_plaintext(conf["HOST"], tls, conf["ALLOW_PLAINTEXT"])
    rates: dict[str, float] = {}
    for entry in (e.strip() for e in conf["RATE_LIMITS"].split(",")):
        if not entry:
            continue
        role, _, value = entry.partition("=")
        try:
            rates[role.strip()] = float(value)
        except ValueError:
            raise ValueError(f"RATE_LIMITS entry {entry!r} is not role=calls_per_second") from None
    return tls, Limits(rate_per_sec=rates, streams_per_identity=conf["STREAMS_PER_IDENTITY"])


class _Bucket:
    def __init__(self, rate: float) -> None:
        self.rate, self.capacity = rate, 2 * rate
        self.tokens, self.stamp = self.capacity, time.monotonic()

    def take(self) -> float:
        """0 if a call may go now, else the seconds until one may."""
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


class _Gate:
    """Decides, per call, who the caller is, whether the method allows it, and
    whether the caller is within its limits."""

    def __init__(self, tokens: TokenTable, roles: dict[str, frozenset[int]], limits: Limits | None = None) -> None:
        self._tokens = tokens
        self._roles = roles
        self._limits = limits or Limits()
        self._buckets: dict[str, _Bucket] = {}
        self.streams: dict[str, int] = {}
        self._refusing = 0

    def admit(self, p: Principal) -> None:
        rate = self._limits.rate_per_sec.get(p.role, 0.0)
        if not rate:
            return
        key = f"{p.role}:{p.name}"
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(rate)
        wait = bucket.take()
        if wait:
            raise ResourceExhausted(
                f"more than {rate:g} calls a second from {p.name}: slow down",
                reason="RATE_LIMITED",
                retry_after=wait,
            )

    def open_stream(self, p: Principal) -> str:
        key = f"{p.role}:{p.name}"
        if self.streams.get(key, 0) >= self._limits.streams_per_identity:
            raise ResourceExhausted(
                f"{p.name} already holds {self._limits.streams_per_identity} open streams: close one first",
                reason="TOO_MANY_STREAMS",
                retry_after=1.0,
            )
        self.streams[key] = self.streams.get(key, 0) + 1
        return key

    def close_stream(self, key: str) -> None:
        left = self.streams.get(key, 1) - 1
        if left > 0:
            self.streams[key] = left
        else:
            self.streams.pop(key, None)

    async def before_refusing(self, requests: AsyncIterator[Any]) -> None:
        """Wait, briefly, for the first message of a client stream the gate
        refuses. A status sent while the caller's first write is still in
        flight makes grpc's client fail that write and report INTERNAL
        ("Internal error from Core") in place of the status we sent: measured
        with a bare handler that only aborts, 1 call in 4 from another
        process. Once its first message is here, its write is done. Bounded
        in time and in how many refusals wait at once: beyond that, refuse
        at once and let a flood's clients read INTERNAL."""
        await self._before_status(requests, 1)

    async def before_refusing_midway(self, requests: AsyncIterator[Any]) -> None:
        """The same for a stream refused after its first message (one that
        did not parse, a time out of range, a hello refused): its later
        writes race the status alike, so wait for the caller to finish
        writing, reading at most MAX_DRAINED more messages. A handler's own
        reader of the stream has ended or been cancelled by then; should it
        still be reading, this read fails and the status goes at once."""
        await self._before_status(requests, MAX_DRAINED)

    async def _before_status(self, requests: AsyncIterator[Any], most: int) -> None:
        if self._refusing >= MAX_WAITING_REFUSALS:
            return
        self._refusing += 1
        try:
            with contextlib.suppress(Exception):  # StopAsyncIteration too: it has finished
                await asyncio.wait_for(_read(requests, most), REFUSAL_WAIT_SECS)
        finally:
            self._refusing -= 1

    def authorize(self, method: str, metadata: Any) -> Principal | None:
        service = method.split("/")[1] if method.count("/") >= 2 else ""
        if service in PUBLIC_SERVICES:
            return None
        allowed = self._roles.get(method)
        if not allowed:
            raise PermissionDenied(f"{method} is not open to any role", reason="METHOD_NOT_ALLOWED")
        token = bearer_token(metadata)
        if token is None:
            raise Unauthenticated(
                "missing bearer token: send metadata 'authorization: Bearer <token>'",
                reason="MISSING_TOKEN",
            )
        principal = self._tokens.lookup(token)
        if principal is None:
            raise Unauthenticated("unknown or revoked token", reason="BAD_TOKEN")
        if principal.expired:
            raise Unauthenticated("the token has expired: ask the network for a new one", reason="TOKEN_EXPIRED")
        if principal.role_value not in allowed:
            raise PermissionDenied(f"role {principal.role} may not call {method}", reason="ROLE_NOT_ALLOWED")
        return principal


class GateInterceptor(grpc.aio.ServerInterceptor):
    """Authentication, authorization and error mapping for every RPC.

    Wraps the handler itself (rather than relying on contextvars set here
    propagating) so the principal and request id are bound in the task that
    runs the handler. Domain errors become a status with ErrorInfo;
    anything unexpected is logged with its trace and answered INTERNAL
    without internals.
    """

    def __init__(self, gate: _Gate) -> None:
        self._gate = gate
        # Wrapped handlers, built once per method: wrapping on every call
        # cost a measurable share of a settlement's CPU.
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            handler = await continuation(handler_call_details)
            if handler is None:
                return handler
            wrapped = self._wrapped[method] = self._wrap(method, handler)
        return wrapped

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        gate = self._gate
        deserialize = _tolerant(handler.request_deserializer)
        service_name, _, method_name = method.strip("/").rpartition("/")
        service_name = service_name.rsplit(".", 1)[-1]
        seconds = RPC_SECONDS.labels(service_name, method_name)

        def count(code: str) -> None:
            RPC_REQUESTS.labels(service_name, method_name, code).inc()

        def code_of(context: grpc.aio.ServicerContext, exc: BaseException | None) -> str:
            if isinstance(exc, AitbcError):
                return exc.code
            if isinstance(exc, asyncio.CancelledError):
                return "CANCELLED"
            status = context.code()
            if isinstance(status, grpc.StatusCode):
                return str(status.name)
            return "OK" if exc is None else "INTERNAL"

        def enter(context: grpc.aio.ServicerContext) -> Principal | None:
            metadata = context.invocation_metadata()
            request_id = _metadata_value(metadata, "x-request-id") or _next_request_id()
            structlog.contextvars.bind_contextvars(request_id=request_id, method=method)
            who = gate.authorize(method, metadata)
            if who is not None:
                gate.admit(who)
            current_principal.set(who)
            return who

        async def on_error(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
            if isinstance(exc, AitbcError):
                if exc.code in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
                    audit("rpc_refused", code=exc.code, reason=exc.reason)
                await _abort(context, exc)
            log.error("rpc_internal_error", error=repr(exc), trace=traceback.format_exc())
            await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the server log")

        if handler.unary_unary:
            inner_uu = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                start = time.perf_counter()
                failure: BaseException | None = None
                try:
                    enter(context)
                    return await inner_uu(_well_formed(request, method), context)
                except (grpc.aio.AbortError, asyncio.CancelledError) as exc:
                    failure = exc
                    raise
                except Exception as exc:
                    failure = exc
                    await on_error(context, exc)
                finally:
                    seconds.observe(time.perf_counter() - start)
                    count(code_of(context, failure))

            return grpc.unary_unary_rpc_method_handler(
                unary_unary,
                request_deserializer=deserialize,
                response_serializer=handler.response_serializer,
            )
        # Both streaming kinds take one argument (a request or an iterator
        # of them) and yield responses: one wrapper serves both.
        inner_stream = handler.unary_stream or handler.stream_stream
        if inner_stream is not None:

            async def streaming(raw: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                arg = raw
                held = ""
                failure: BaseException | None = None
                admitted = False
                try:
                    who = enter(context)
                    if who is not None:
                        held = gate.open_stream(who)
                    admitted = True
                    arg = _well_formed_stream(raw, method) if handler.stream_stream else _well_formed(raw, method)
                    async for item in inner_stream(arg, context):
                        yield item
                except (grpc.aio.AbortError, asyncio.CancelledError) as exc:
                    failure = exc
                    raise
                except Exception as exc:
                    failure = exc
                    if handler.stream_stream and not admitted:
                        await gate.before_refusing(raw)
                    elif handler.stream_stream:
                        await gate.before_refusing_midway(raw)
                    await on_error(context, exc)
                finally:
                    if held:
                        gate.close_stream(held)
                    count(code_of(context, failure))

            make = (
                grpc.unary_stream_rpc_method_handler if handler.unary_stream else grpc.stream_stream_rpc_method_handler
            )
            return make(
                streaming,
                request_deserializer=deserialize,
                response_serializer=handler.response_serializer,
            )
        # Client-streaming RPCs are not part of the contract yet; refuse
        # rather than pass them through unchecked.
        raise RuntimeError(f"unsupported handler kind for {method}")


class _Malformed:
    """What a request that does not parse deserializes to: the handler
    wrapper turns it into INVALID_ARGUMENT once the caller is authorized
    (grpc itself would answer UNKNOWN with a parser trace)."""


MALFORMED = _Malformed()


def _tolerant(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception:  # DecodeError, and invalid UTF-8 in a string field
            return MALFORMED

    return parse


def _well_formed(request: Any, method: str) -> Any:
    if request is MALFORMED:
        raise InvalidArgument(
            f"the request is not a valid {method.rsplit('/', 1)[-1]} request", reason="MALFORMED_REQUEST"
        )
    return well_formed(request)


async def _well_formed_stream(requests: AsyncIterator[Any], method: str) -> AsyncIterator[Any]:
    async for request in requests:
        yield _well_formed(request, method)


async def _read(requests: AsyncIterator[Any], most: int) -> None:
    it = aiter(requests)
    for _ in range(most):
        await anext(it)


_REQUEST_IDS = itertools.count(1)
_PROCESS_TAG = os.urandom(3).hex()


def _next_request_id() -> str:
    """Unique per process run and cheap: request ids are minted per call."""
    return f"{_PROCESS_TAG}-{next(_REQUEST_IDS)}"


def _metadata_value(metadata: Any, key: str) -> str | None:
    for k, v in metadata or ():
        if k == key and isinstance(v, str):
            return v
    return None


def principal() -> Principal:
    """The caller of the current RPC. Only valid inside a gated handler."""
    p = current_principal.get()
    if p is None:
        raise Unauthenticated("no authenticated caller", reason="MISSING_TOKEN")
    return p


class Service:
    """A gRPC server with the shared plumbing, built by each service's
    build_server()."""

    def __init__(
        self,
        *,
        services: Sequence[ServiceDescriptor],
        register: Iterable[Callable[[grpc.aio.Server], None]],
        tokens: TokenTable,
        host: str,
        port: int,
        limits: Limits | None = None,
        tls: TlsConfig | None = None,
    ) -> None:
        self.health = health.aio.HealthServicer()
        self.gate = _Gate(tokens, role_table(services), limits)
        self.server = grpc.aio.server(
            interceptors=[GateInterceptor(self.gate)],
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.keepalive_permit_without_calls", 1),
                # Pings closer than this (clients keep alive every 20 s) are
                # strikes; after two the connection gets GOAWAY: a ping flood
                # costs its sender its connection, not the server its CPU.
                ("grpc.http2.min_ping_interval_without_data_ms", 5000),
                ("grpc.http2.max_ping_strikes", 2),
                ("grpc.max_connection_idle_ms", 30 * 60 * 1000),
            ],
        )
        for add in register:
            add(self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = [s.full_name for s in services]
        reflection.enable_server_reflection([*names, reflection.SERVICE_NAME, health.SERVICE_NAME], self.server)
        self._names = names
        if tls is not None and tls.serves_tls:
            self.port = self.server.add_secure_port(f"{host}:{port}", tls.server_credentials())
        else:
            self.port = self.server.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise OSError(f"could not bind {host}:{port}")

    async def start(self) -> None:
        await self.server.start()
        for name in ["", *self._names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def set_serving(self, serving: bool) -> None:
        """Health of the whole server: NOT_SERVING while it cannot do its
        work (its database is away). Ignored once shutting down."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self._names]:
            await self.health.set(name, status)

    async def stop(self, grace: float) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


def write_ready_file(path: str | os.PathLike[str] | None, port: int) -> None:
    """Atomically write the bound port, so a supervisor started with port 0
    learns it only once the server answers."""
    if not path:
        return
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(f"{port}\n")
    tmp.replace(p)


async def wait_for_shutdown_signal() -> str:
    loop = asyncio.get_running_loop()
    stopped: asyncio.Future[str] = loop.create_future()

    def on_signal(sig: signal.Signals) -> None:
        if not stopped.done():
            stopped.set_result(sig.name)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    return await stopped
