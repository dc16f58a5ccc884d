"""`make bench`: measure, print, and record the medians in BENCHMARKS.md."""

from __future__ import annotations

import contextlib
import os
import platform
import re
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

from aitbc.pgtemp import PostgresUnavailable, TempPostgres
from bench import e2e, miner_overhead, wallet_settlements, workloads

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- bench:wallet:begin -->", "<!-- bench:wallet:end -->"
MBEGIN, MEND = "<!-- bench:miner:begin -->", "<!-- bench:miner:end -->"
WBEGIN, WEND = "<!-- bench:workloads:begin -->", "<!-- bench:workloads:end -->"


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


def wallet_section() -> str:
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
    return "\n".join([BEGIN, f"Measured {datetime.now(UTC):%Y-%m-%d} on {machine()}.", "", *table, END])


def miner_section() -> str:
    m = miner_overhead.run()
    return "\n".join(
        [
            MBEGIN,
            f"Measured {datetime.now(UTC):%Y-%m-%d} on {machine()}.",
            "",
            f"matmul n={miner_overhead.N} fp32 x{miner_overhead.REPEATS} on the CPU, {miner_overhead.JOBS} jobs each:",
            "",
            "| path | median seconds per job | runs |",
            "| --- | --- | --- |",
            f"| bare loop, one process | **{m['bare']:.3f}** | {', '.join(f'{x:.3f}' for x in m['bare_runs'])} |",
            f"| through the sidecar (assigned to result in) | **{m['sidecar']:.3f}** | "
            f"{', '.join(f'{x:.3f}' for x in m['sidecar_runs'])} |",
            "",
            f"Overhead: **{m['overhead']:+.1%}**.",
            MEND,
        ]
    )


def workloads_section() -> str:
    w = workloads.run()
    seconds = ", ".join
    lines = [
        WBEGIN,
        f"Measured {datetime.now(UTC):%Y-%m-%d} on {machine()}, CPU only; medians of {workloads.RUNS} warm runs.",
        "",
        "matmul fp32: the miner's whole run (making A and B from the seed, the multiplications, writing C)",
        "against the coordinator's check of its result (making A and B again and 20 Freivalds rounds in float64,",
        "block by block from C's file, on one BLAS thread, as the coordinator runs it):",
        "",
        "| n | repeats | miner (s) | verification (s) | verification / miner | miner runs | verification runs |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in w["matmul"]:
        lines.append(
            f"| {r['n']} | {r['repeats']} | {r['miner']:.4f} | {r['verify']:.4f} | **{r['ratio']:.1%}** | "
            f"{seconds(f'{x:.4f}' for x in r['miner_runs'])} | {seconds(f'{x:.4f}' for x in r['verify_runs'])} |"
        )
    llm, llm_runs = w["llm"]
    embed, embed_runs = w["embed"]
    lines += [
        "",
        "| workload | model | median | runs |",
        "| --- | --- | --- | --- |",
        f"| llm_gen, greedy, 128 tokens | tiny 2-layer GPT-2 (built offline) | **{llm:.0f} tokens/s** | "
        f"{seconds(f'{x:.0f}' for x in llm_runs)} |",
        f"| embed, 64 texts | all-MiniLM-L6-v2 (packaged) | **{embed:.0f} texts/s** | "
        f"{seconds(f'{x:.0f}' for x in embed_runs)} |",
        WEND,
    ]
    return "\n".join(lines)


PARTS = {
    "wallet": (BEGIN, END, "Wallet settlements", wallet_section),
    "miner": (MBEGIN, MEND, "Miner harness overhead", miner_section),
    "workloads": (WBEGIN, WEND, "Workloads: verification cost and throughput", workloads_section),
    "e2e": (e2e.BEGIN, e2e.END, "Coordinator end to end (`make bench e2e`)", lambda: ""),
}
# What plain `make bench` runs: e2e takes ~20 minutes and runs only when named.
DEFAULT = ["wallet", "miner", "workloads"]


def main(argv: list[str]) -> None:
    """`python -m bench [wallet] [miner] [workloads] [e2e [--quick] [--runs=N]]`: the named
    parts, or all but e2e; each part's section of BENCHMARKS.md is rewritten as soon as it is
    measured (a --quick e2e run only prints its table)."""
    path = ROOT / "BENCHMARKS.md"
    flags = [a for a in argv if a.startswith("--")]
    for name in [a for a in argv if not a.startswith("--")] or DEFAULT:
        begin, end, title, measure = PARTS[name]
        section = e2e.main(flags) if name == "e2e" else measure()
        if section is None:
            continue
        text = path.read_text() if path.exists() else "# Benchmarks\n\n"
        path.write_text(_put(text, begin, end, section, title))
        print(f"wrote {name} to {path}")


def _put(text: str, begin: str, end: str, section: str, title: str) -> str:
    if begin in text:
        return re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: section, text, flags=re.S)
    return text.rstrip() + f"\n\n## {title}\n\n" + section + "\n"


if __name__ == "__main__":
    main(sys.argv[1:])
