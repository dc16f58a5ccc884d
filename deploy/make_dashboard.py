"""Writes deploy/grafana-dashboard.json (python deploy/make_dashboard.py):
the marketplace, the miners and the wallet on one Grafana dashboard. The
JSON is committed; edit this and regenerate rather than the JSON by hand.
tests/test_dashboard.py checks the JSON against a schema and every query
against the metrics the services export."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DS = {"type": "prometheus", "uid": "${datasource}"}
RATE = "5m"


def panel(pid: int, title: str, exprs: list[tuple[str, str]], x: int, y: int, *, unit: str = "short",
          kind: str = "timeseries", w: int = 8, h: int = 8) -> dict[str, Any]:  # fmt: skip
    return {
        "id": pid,
        "type": kind,
        "title": title,
        "datasource": DS,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {},
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": DS, "expr": expr, "legendFormat": legend}
            for i, (expr, legend) in enumerate(exprs)
        ],
    }


def row(pid: int, title: str, y: int) -> dict[str, Any]:
    return {"id": pid, "type": "row", "title": title, "collapsed": False, "gridPos": {"x": 0, "y": y, "w": 24, "h": 1},
            "panels": []}  # fmt: skip


def quantiles(metric: str, by: str) -> list[tuple[str, str]]:
    return [
        (f"histogram_quantile({q}, sum(rate({metric}_bucket[{RATE}])) by (le, {by}))", f"p{int(q * 100)} {{{{{by}}}}}")
        for q in (0.5, 0.99)
    ]


def dashboard() -> dict[str, Any]:
    p: list[dict[str, Any]] = [
        row(1, "Marketplace", 0),
        panel(2, "Jobs settled per second", [
            (f'sum(rate(aitbc_job_transitions_total{{state="SETTLED"}}[{RATE}])) by (workload)', "{{workload}}")],
            0, 1, unit="reqps"),
        panel(3, "Jobs by state", [("sum(aitbc_jobs) by (state)", "{{state}}")], 8, 1),
        panel(4, "Queue depth per workload", [('sum(aitbc_jobs{state="QUEUED"}) by (workload)', "{{workload}}")],
              16, 1),
        panel(5, "Dispatch latency", quantiles("aitbc_dispatch_latency_seconds", "workload"), 0, 9, unit="s"),
        panel(6, "End-to-end latency (submit to settled)", quantiles("aitbc_job_e2e_seconds", "workload"), 8, 9,
              unit="s"),
        panel(7, "Verdicts per second", [
            (f"sum(rate(aitbc_verdicts_total[{RATE}])) by (verdict)", "{{verdict}}")], 16, 9, unit="reqps"),
        panel(8, "RPC errors per second", [
            (f'sum(rate(aitbc_rpc_requests_total{{code!="OK"}}[{RATE}])) by (method, code)', "{{method}} {{code}}")],
            0, 17, unit="reqps"),
        panel(9, "RPC latency p99", [(
            f"histogram_quantile(0.99, sum(rate(aitbc_rpc_duration_seconds_bucket[{RATE}])) by (le, method))",
            "{{method}}")], 8, 17, unit="s"),
        panel(10, "Settlement backlog", [("sum(aitbc_settlement_backlog)", "undelivered")], 16, 17),
        row(11, "Miners", 25),
        panel(12, "Connected miners and free slots", [
            ("sum(aitbc_miners_connected)", "miners"), ("sum(aitbc_miner_free_slots)", "free slots")], 0, 26),
        panel(13, "GPU utilisation", [("aitbc_gpu_utilization_percent", "{{miner_id}} gpu{{gpu}}")], 8, 26,
              unit="percent"),
        panel(14, "GPU memory used", [("aitbc_gpu_memory_used_bytes", "{{miner_id}} gpu{{gpu}}")], 16, 26,
              unit="bytes"),
        panel(15, "GPU power", [("aitbc_gpu_power_watts", "{{miner_id}} gpu{{gpu}}")], 0, 34, unit="watt"),
        panel(16, "GPU temperature", [("aitbc_gpu_temperature_celsius", "{{miner_id}} gpu{{gpu}}")], 8, 34,
              unit="celsius"),
        panel(17, "Energy per accepted run", [(
            "sum(rate(aitbc_job_energy_joules_sum[15m])) by (workload)"
            " / sum(rate(aitbc_job_energy_joules_count[15m])) by (workload)", "{{workload}}")], 16, 34,
            unit="joule"),
        panel(18, "Earnings per miner, last hour (AIT)", [
            ("sum(increase(aitbc_miner_earnings_uait_total[1h])) by (miner_id) / 1e6", "{{miner_id}}")], 0, 42,
            w=12),
        panel(19, "Sidecar jobs by outcome", [
            (f"sum(rate(aitbc_miner_jobs_total[{RATE}])) by (instance, outcome)", "{{instance}} {{outcome}}")],
            12, 42, w=12, unit="reqps"),
        row(20, "Wallet", 50),
        panel(21, "Volume by kind (AIT/s)", [
            (f"sum(rate(aitbc_wallet_volume_uait_total[{RATE}])) by (kind) / 1e6", "{{kind}}")], 0, 51),
        panel(22, "Supply and treasury (AIT)", [
            ("max(aitbc_wallet_supply_uait) / 1e6", "minted"),
            ("max(aitbc_wallet_treasury_balance_uait) / 1e6", "treasury")], 8, 51),
        panel(23, "Escrow", [
            ("max(aitbc_wallet_held_uait) / 1e6", "held (AIT)"), ("max(aitbc_wallet_open_holds)", "open holds")],
            16, 51),
        row(24, "Result storage", 59),
        panel(25, "Result blobs (bytes)", [("max(aitbc_result_blobs_bytes)", "BLOBS_DIR")], 0, 60, w=12,
              unit="bytes"),
        panel(26, "Result blobs (count) and deleted by retention per second", [
            ("max(aitbc_result_blobs)", "blobs"),
            (f"sum(rate(aitbc_result_blobs_deleted_total[{RATE}]))", "deleted/s")], 12, 60, w=12),
    ]  # fmt: skip
    return {
        "uid": "aitbc-overview",
        "title": "AITBC — marketplace, miners, wallet",
        "tags": ["aitbc"],
        "timezone": "utc",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {
            "list": [{"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus"}]
        },
        "annotations": {"list": []},
        "panels": p,
    }


def main() -> None:
    out = Path(__file__).with_name("grafana-dashboard.json")
    out.write_text(json.dumps(dashboard(), indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
