"""deploy/grafana-dashboard.json is a valid Grafana dashboard (checked
against a JSON Schema of the dashboard model's required parts), it is what
deploy/make_dashboard.py writes, and every metric its queries name is one
the running services export."""

from __future__ import annotations

import json
import re
import sys
import urllib.request
from typing import Any

import jsonschema
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ROOT, Network

DASHBOARD = ROOT / "deploy" / "grafana-dashboard.json"

TARGET = {
    "type": "object",
    "required": ["refId", "expr", "datasource"],
    "properties": {"refId": {"type": "string", "pattern": "^[A-Z]$"}, "expr": {"type": "string", "minLength": 1}},
}
GRID = {
    "type": "object",
    "required": ["x", "y", "w", "h"],
    "properties": {
        "x": {"type": "integer", "minimum": 0, "maximum": 23},
        "y": {"type": "integer", "minimum": 0},
        "w": {"type": "integer", "minimum": 1, "maximum": 24},
        "h": {"type": "integer", "minimum": 1},
    },
}
PANEL = {
    "type": "object",
    "required": ["id", "type", "title", "gridPos"],
    "properties": {
        "id": {"type": "integer"},
        "type": {"enum": ["row", "timeseries", "stat", "gauge", "bargauge", "table"]},
        "title": {"type": "string", "minLength": 1},
        "gridPos": GRID,
        "targets": {"type": "array", "items": TARGET},
    },
    "if": {"properties": {"type": {"not": {"const": "row"}}}},
    "then": {"required": ["targets", "datasource"], "properties": {"targets": {"minItems": 1}}},
}
SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["uid", "title", "schemaVersion", "panels", "time", "templating"],
    "properties": {
        "uid": {"type": "string", "pattern": "^[a-zA-Z0-9_-]{1,40}$"},
        "title": {"type": "string", "minLength": 1},
        "schemaVersion": {"type": "integer", "minimum": 30},
        "time": {"type": "object", "required": ["from", "to"]},
        "templating": {"type": "object", "required": ["list"]},
        "panels": {"type": "array", "minItems": 1, "items": PANEL},
    },
}


def load() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def test_the_dashboard_is_valid_and_current() -> None:
    board = load()
    jsonschema.validate(board, SCHEMA)
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    sys.path.insert(0, str(ROOT / "deploy"))
    try:
        import make_dashboard

        assert make_dashboard.dashboard() == board, "regenerate with: python deploy/make_dashboard.py"
    finally:
        sys.path.pop(0)
    # Broken JSON must not pass the schema (a guard on the guard).
    broken = load()
    del broken["panels"][1]["targets"]
    try:
        jsonschema.validate(broken, SCHEMA)
    except jsonschema.ValidationError:
        pass
    else:
        raise AssertionError("the schema accepts a panel without queries")


def exported(net: Network) -> set[str]:
    """Every sample name the services can produce, from their HELP/TYPE
    lines (labelled metrics are listed before their first sample)."""
    names: set[str] = set()
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                "gauge": ("",), "unknown": ("",)}  # fmt: skip
    for ready in (net.root / "run").glob("*.metrics"):
        text = urllib.request.urlopen(f"http://127.0.0.1:{int(ready.read_text())}/metrics", timeout=5).read().decode()
        for family in text_string_to_metric_families(text):
            names.update(family.name + s for s in suffixes.get(family.type, ("",)))
    return names


def test_every_query_names_an_exported_metric(network: Network) -> None:
    network.start_wallet()
    network.start_coordinator()
    network.start_miner()
    names = exported(network)
    queried: set[str] = set()
    for p in load()["panels"]:
        for t in p.get("targets", []):
            queried.update(re.findall(r"\baitbc_[a-z0-9_]+", t["expr"]))
    assert queried, "no queries found"
    missing = sorted(queried - names)
    assert not missing, f"the dashboard queries metrics nobody exports: {missing}"


def test_the_scrape_config_covers_every_service() -> None:
    text = (ROOT / "deploy" / "prometheus.yml").read_text()
    for port in ("9100", "9101", "9102"):
        assert f"127.0.0.1:{port}" in text
