"""`make bench`: measure, print, and record the medians in BENCHMARKS.md."""

from __future__ import annotations

import contextlib
import os
import platform
import re
import sqlite3
import subprocess
from datetime import UTC, datetime
from pathlib import Path

from aitbc.pgtemp import PostgresUnavailable, TempPostgres
from bench import wallet_settlements

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- bench:wallet:begin -->", "<!-- bench:wallet:end -->"


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    pg = "n/a"
    with contextlib.suppress(OSError):
        pg = subprocess.run(["psql", "--version"], capture_output=True, text=True).stdout.strip()
    return (
        f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB, Linux {platform.release()}; "
        f"Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}, {pg}"
    )


def main() -> None:
    pg: TempPostgres | None = None
    try:
        pg = TempPostgres().start()
    except PostgresUnavailable as exc:
        print(f"PostgreSQL unavailable, measuring SQLite only: {exc}")
    try:
        rows = wallet_settlements.run(pg.new_database if pg else None)
    finally:
        if pg:
            pg.stop()
    table = [
        "| store | call | concurrent callers | settlements per run | median settlements/s | the 5 runs |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        runs = ", ".join(f"{x:.0f}" for x in r["runs"])
        table.append(
            f"| {r['store']} | {r['call']} | {r['callers']} | {r['settlements']} | **{r['median']:.0f}** | {runs} |"
        )
    section = "\n".join(
        [
            BEGIN,
            f"Measured {datetime.now(UTC):%Y-%m-%d} on {machine()}.",
            "",
            *table,
            END,
        ]
    )
    path = ROOT / "BENCHMARKS.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    if BEGIN in text:
        text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), section, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n## Wallet settlements\n\n" + section + "\n"
    path.write_text(text)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
