"""Composition of the coordinator server."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from aitbc.auth import TokenTable
from aitbc.config import Option
from aitbc.metrics import metrics_options
from aitbc.server import SERVER_OPTIONS, Service, server_settings
from aitbc.v1 import coordinator_pb2, coordinator_pb2_grpc
from coordinator_svc._jobs import Coordinator
from coordinator_svc._servicer import CoordinatorAdminServicer, CoordinatorServicer, MinerGatewayServicer

OPTIONS = [
    Option("HOST", str, "127.0.0.1", "address to listen on"),
    Option("PORT", int, 50051, "port to listen on (0 picks a free one)"),
    Option("DB", str, "var/coordinator.sqlite", "SQLite job store file, or a postgresql:// URL shared by replicas"),
    Option("BLOBS_DIR", Path, Path("var/blobs"), "content-addressed job outputs"),
    Option("TOKENS_FILE", Path, Path("var/dev/principals.json"), "principals and token hashes (JSON)"),
    Option("KEY_FILE", Path, Path("var/dev/coordinator.key"), "Ed25519 key that signs settlements (0600)"),
    Option("WALLET_TARGET", str, "127.0.0.1:50052", "wallet gRPC address"),
    Option("WALLET_TOKEN", str, "", "bearer token of the coordinator's identity at the wallet"),
    Option("NETWORK_ID", str, "aitbc-devnet", "network receipts and settlements name"),
    Option("HEARTBEAT_SECS", float, 5.0, "heartbeat interval asked of miners"),
    Option("LEASE_SECS", float, 30.0, "lease length; heartbeats extend it"),
    Option(
        "RECONNECT_GRACE_SECS",
        float,
        30.0,
        "a miner whose stream ends keeps its leases this long: reconnecting within it, it delivers their results "
        "and nothing runs again; past it they are requeued (0: requeued at once)",
    ),
    Option(
        "RESULT_RETENTION_DAYS",
        float,
        7.0,
        "a job's result is deleted this long after the job ended (GetJobResult then says RESULT_EXPIRED); "
        "a blob other kept jobs share stays for them; 0 keeps results for ever",
    ),
    Option(
        "JOB_RETENTION_DAYS",
        float,
        30.0,
        "a finished job's row (GetJob, ListJobs, its request_id) is deleted this long after it ended, never before "
        "its result; at least RESULT_RETENTION_DAYS; 0 keeps rows for ever",
    ),
    Option("RETENTION_SWEEP_SECS", float, 60.0, "how often retention deletes a batch and measures the blob store"),
    Option("MAX_ATTEMPTS", int, 3, "dispatch attempts before a job fails"),
    Option("FEE_BPS", int, 500, "treasury fee, in basis points of the price"),
    Option("BAN_AFTER", int, 3, "refused results after which a miner is banned"),
    Option(
        "RUN_BOUND_FACTOR",
        float,
        3.0,
        "a job is taken back from a miner with no result after this many times the workload's estimate for a "
        "slow CPU or GPU (see each workload's run_seconds), heartbeats or not; it counts as a refused result",
    ),
    Option("RUN_BOUND_FLOOR_SECS", float, 300.0, "the shortest run-time bound any job gets"),
    Option(
        "MAX_RESULT_BYTES",
        int,
        64 * 2**20,
        "largest output a job may return; bounds each result's disk and check memory (matmul n=4096 fp32 by default)",
    ),
    Option(
        "CHECK_MEMORY_BYTES",
        int,
        128 * 2**20,
        "what the output checks in flight may hold together; a result waits for its share before it is checked",
    ),
    Option("CHECK_THREADS", int, 2, "threads output checks run on, off the event loop"),
    Option(
        "REFEREE_WAIT_SECS",
        float,
        600.0,
        "how long runs that disagree wait for an independent referee before the job is refunded",
    ),
    Option("EMBED_MODELS", str, "", "embed models jobs may name beyond all-minilm-l6-v2=384, as name=dimensions,…"),
    Option(
        "PRICES",
        str,
        "",
        "price table over the defaults, workload=base+per_unit,… in uait per run and per unit: "
        "matmul=1000+1 (MFLOP), llm_gen=1000+10 (token), embed=500+100 (text), sd_infer=2000+1 (kilopixel-step)",
    ),
    Option("READY_FILE", str, "", "write the bound port here once serving"),
    Option("LOG_LEVEL", str, "info", "debug, info, warning or error"),
    Option("SHUTDOWN_GRACE", float, 5.0, "seconds in-flight calls get on shutdown"),
    *metrics_options(9100),
    *SERVER_OPTIONS,
]


@dataclass
class CoordinatorDeps:
    core: Coordinator
    tokens: TokenTable


def build_server(config: dict, deps: CoordinatorDeps) -> tuple[Service, int]:
    client = CoordinatorServicer(deps.core)
    gateway = MinerGatewayServicer(deps.core, deps.tokens)
    admin = CoordinatorAdminServicer(deps.core)
    tls, limits = server_settings(config)
    service = Service(
        tls=tls,
        limits=limits,
        services=[
            coordinator_pb2.DESCRIPTOR.services_by_name["CoordinatorService"],
            coordinator_pb2.DESCRIPTOR.services_by_name["MinerGatewayService"],
            coordinator_pb2.DESCRIPTOR.services_by_name["CoordinatorAdminService"],
        ],
        register=[
            lambda s: coordinator_pb2_grpc.add_CoordinatorServiceServicer_to_server(client, s),
            lambda s: coordinator_pb2_grpc.add_MinerGatewayServiceServicer_to_server(gateway, s),
            lambda s: coordinator_pb2_grpc.add_CoordinatorAdminServiceServicer_to_server(admin, s),
        ],
        tokens=deps.tokens,
        host=config["HOST"],
        port=config["PORT"],
    )
    return service, service.port
