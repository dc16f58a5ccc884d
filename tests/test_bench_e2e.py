"""`make bench e2e` in miniature: its smallest load scenario for a few
seconds against real wallet and coordinator processes, and against the
bench's baseline coordinator. Checks that the bench's report is sane (jobs
flowed, every one settled, the books balance), never its timings."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from bench import e2e

pytestmark = pytest.mark.timeout(120)

TINY = replace(e2e.QUICK, window=1.5, warmup=0.5, light=1.0, submitters=2, depth=2)


@pytest.mark.parametrize("kind", ["aitbc", "baseline"])
def test_the_smallest_scenario_reports_settled_jobs_and_balanced_books(kind: str) -> None:
    fig = e2e.load_run(kind, TINY, miners=1, check_books=True)
    assert fig["books"] == "", fig["books"]
    assert fig["jobs"] > 0 and fig["unsettled"] == 0, fig["problems"]
    assert fig["settled"] == fig["jobs"]
    assert fig["welcomed"] == 1 and not fig["refused"], fig["problems"]
    assert fig["rate"] > 0 and fig["light_n"] > 0
    for key in ("cpu_us", "light_p50", "light_p99", "p80_p50", "s2s_p80_p99"):
        assert math.isfinite(fig[key]), (key, fig)
    assert fig["light_p50"] <= fig["light_p99"]
