"""Prometheus metrics, one registry per process, served on a port of its own
(METRICS_PORT; 0 picks one, -1 turns them off). Names are aitbc_*; units in
the name; labels are bounded sets (method, code, state, workload, verdict,
miner_id, gpu), never job ids.

Each service declares its metrics in its own module against this registry;
what every gRPC server shares (RPC counts and latencies) is here."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from aitbc.config import Option

REGISTRY = CollectorRegistry(auto_describe=True)

METRICS_OPTION_DOC = "port of the Prometheus metrics endpoint (0 picks one, -1 turns it off)"

RPC_REQUESTS = Counter(
    "aitbc_rpc_requests_total", "RPCs answered, by method and status code", ["service", "method", "code"],
    registry=REGISTRY,
)  # fmt: skip
RPC_SECONDS = Histogram(
    "aitbc_rpc_duration_seconds", "Time to answer a unary RPC", ["service", "method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
    registry=REGISTRY,
)  # fmt: skip


def gpu_gauges(prefix: str, labels: list[str]) -> dict[str, Gauge]:
    """One gauge per telemetry field (named as GpuTelemetry's fields)."""
    return {
        name: Gauge(f"{prefix}_{name}", doc, labels, registry=REGISTRY)
        for name, doc in (
            ("utilization_percent", "GPU utilisation over the last sample period"),
            ("memory_used_bytes", "GPU memory in use"),
            ("power_watts", "GPU power draw"),
            ("temperature_celsius", "GPU core temperature"),
        )
    }


def metrics_options(default_port: int) -> list[Option]:
    return [
        Option("METRICS_PORT", int, default_port, METRICS_OPTION_DOC),
        Option("METRICS_HOST", str, "127.0.0.1", "address of the metrics endpoint (it has no auth: keep it internal)"),
    ]


def serve_metrics(port: int, host: str = "127.0.0.1", ready_file: str = "") -> int:
    """Start the endpoint on a thread; the bound port (0 when turned off).
    With a ready file, the port is also written to `<ready_file>.metrics`."""
    if port < 0:
        return 0
    server, _ = start_http_server(port, addr=host, registry=REGISTRY)
    bound = int(server.server_port)
    if ready_file:
        from aitbc.server import write_ready_file

        write_ready_file(ready_file + ".metrics", bound)
    return bound
