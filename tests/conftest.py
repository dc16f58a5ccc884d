"""Shared fixtures: real service processes on loopback, port 0."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from aitbc.localnet import ROOT, Identity, Network, make_network

__all__ = ["ROOT", "Identity", "Network", "eventually", "make_network", "md"]
T = TypeVar("T")


async def eventually(check: Callable[[], Awaitable[T]], *, timeout: float = 30.0, interval: float = 0.05) -> T:
    """Retry `check` until it returns without raising AssertionError."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
        await asyncio.sleep(interval)


@pytest.fixture
def network(tmp_path: Path) -> Iterator[Network]:
    net = make_network(tmp_path / "net")
    try:
        yield net
    finally:
        net.stop_all()


def md(ident: Identity) -> Any:
    return (("authorization", f"Bearer {ident.token}"),)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Any]:
    """One throwaway PostgreSQL server for the session; tests take fresh
    databases from it. Skips where PostgreSQL cannot start, except when
    AITBC_REQUIRE_POSTGRES=1 (as in .ci/run), where that is a failure."""
    from aitbc.pgtemp import PostgresUnavailable, TempPostgres

    try:
        server = TempPostgres().start()
    except PostgresUnavailable as exc:
        if os.environ.get("AITBC_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"PostgreSQL is required here but could not start: {exc}")
        pytest.skip(f"PostgreSQL unavailable: {exc}")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh ledger database of each kind."""
    if request.param == "sqlite":
        return str(tmp_path / "ledger.sqlite")
    return str(request.getfixturevalue("pg_server").new_database())


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The MODELS option for a sidecar holding the tiny GPT-2 and Stable
    Diffusion pipeline, built here, offline (embed's MiniLM is packaged)."""
    from aitbc.tinymodels import build_tiny_gpt2, build_tiny_sd

    root = tmp_path_factory.mktemp("models")
    gpt2, sd = build_tiny_gpt2(root / "tiny-gpt2"), build_tiny_sd(root / "tiny-sd")
    return f"llm_gen:tiny-gpt2={gpt2},sd_infer:tiny-sd={sd}"
