"""matmul: inputs are the same everywhere, honest torch output passes
Freivalds with margin, and wrong output of every kind fails."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from aitbc.errors import InvalidArgument
from aitbc.workloads.matmul import (
    MAX_N,
    MatmulParams,
    encode_output,
    freivalds,
    freivalds_file,
    input_rows,
    make_inputs,
    round_to_dtype,
)
from miner_svc._run_matmul import run_matmul
from tests.downgrades import KINDS, downgraded

DTYPES = ["fp32", "fp16", "bf16"]
OFF = {"fp32": 0.01, "fp16": 1.0, "bf16": 8.0}


def test_inputs_are_pinned_to_the_generator_not_to_numpy_internals() -> None:
    # If this digest moves, every miner and coordinator on an older build
    # disagrees with this one: that is a protocol change, not a refactor.
    a, b = make_inputs(MatmulParams(n=8, dtype="fp32", seed=42))
    digest = hashlib.sha256(a.tobytes() + b.tobytes()).hexdigest()
    assert digest == PINNED_DIGEST
    assert a.min() >= -1.0 and a.max() < 1.0


# Moved once on purpose (2026-11-27): two values per PCG64 output, to halve
# the generation that dominates both the miner's and the checker's time.
PINNED_DIGEST = "21a9efae6f4ae7b56fbd1908162426d8963d1ad9d30a97fa89c960af6d706c44"


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_rounding_matches_torch(dtype: str) -> None:
    x = np.random.default_rng(1).uniform(-4, 4, 10_000).astype(np.float32)
    tdtype = torch.float16 if dtype == "fp16" else torch.bfloat16
    expected = torch.from_numpy(x).to(tdtype).to(torch.float32).numpy()
    assert np.array_equal(round_to_dtype(x, dtype), expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 3, 64, 300])
def test_honest_cpu_result_passes_with_margin(tmp_path: Path, dtype: str, n: int) -> None:
    params = MatmulParams(n=n, dtype=dtype, seed=n + 7)
    outcome = run_matmul(params, "cpu", tmp_path / "c.bin")
    data = (tmp_path / "c.bin").read_bytes()
    assert outcome.output_size == len(data) == params.output_size
    check = freivalds(params, data)
    assert check.ok, check.detail
    # Both bounds sit at least 3x above honest error (matmul.py derives
    # them): a run that needs more than a third of either means a bound is
    # too tight for some device.
    assert check.worst_ratio < 1 / 3, check.worst_ratio


def _exact(params: MatmulParams) -> np.ndarray:
    a, b = make_inputs(params)
    return a.astype(np.float64) @ b.astype(np.float64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_wrong_results_fail(dtype: str) -> None:
    params = MatmulParams(n=128, dtype=dtype, seed=9)
    c = _exact(params)
    assert freivalds(params, encode_output(params, c)).ok
    a, b = make_inputs(params)
    wrong = {
        "zeros": np.zeros_like(c),
        "transposed": c.T,
        "other seed": _exact(MatmulParams(n=128, dtype=dtype, seed=10)),
        "B @ A": b.astype(np.float64) @ a.astype(np.float64),
        "random": np.random.default_rng(0).normal(0, np.std(c), c.shape),
        # Finite but absurd: the float32 check products overflow to inf and
        # inf - inf is NaN, which must fail rather than compare as small.
        "near float32 max": np.where(np.arange(c.size).reshape(c.shape) % 2, 3e38, -3e38),
        # The smallest single-element error each dtype resolves: low
        # precision leaves honest noise that a tiny error hides in.
        "one element off": c + np.pad(np.full((1, 1), OFF[dtype]), ((5, 122), (7, 120))),
    }
    for name, bad in wrong.items():
        with np.errstate(over="ignore"):  # the absurd C overflows fp16 on purpose
            encoded = encode_output(params, bad)
        check = freivalds(params, encoded)
        assert not check.ok, name


def test_malformed_output_fails() -> None:
    params = MatmulParams(n=16, dtype="fp32", seed=1)
    good = encode_output(params, _exact(params))
    assert not freivalds(params, good[:-4]).ok
    assert not freivalds(params, good + b"\0\0\0\0").ok
    nan = bytearray(good)
    nan[0:4] = np.float32("nan").tobytes()
    assert not freivalds(params, bytes(nan)).ok


@pytest.mark.parametrize(
    ("params", "field"),
    [
        (MatmulParams(n=0, dtype="fp32", seed=1), "spec.matmul.n"),
        (MatmulParams(n=MAX_N + 1, dtype="fp32", seed=1), "spec.matmul.n"),
        (MatmulParams(n=4, dtype="", seed=1), "spec.matmul.dtype"),
        (MatmulParams(n=4, dtype="fp32", seed=1, repeats=101), "spec.matmul.repeats"),
    ],
)
def test_bad_params_are_refused(params: MatmulParams, field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        params.validate()
    assert err.value.field == field


@pytest.mark.parametrize("n", [1, 5, 64, 301])
def test_inputs_made_block_by_block_are_the_inputs(n: int) -> None:
    # The checker makes A and B a row block at a time; the miner makes them
    # whole: the two must be the same numbers, bit for bit.
    for dtype in DTYPES:
        params = MatmulParams(n=n, dtype=dtype, seed=n * 31 + 1)
        a, b = make_inputs(params)
        for first, stop in [(0, n), (n // 2, n), (1, min(n, 4))]:
            if stop > first:
                assert np.array_equal(input_rows(params, "A", first, stop), a[first:stop])
                assert np.array_equal(input_rows(params, "B", first, stop), b[first:stop])


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_precision_downgrades_are_refused_every_time(kind: str) -> None:
    # 20 tries, each with fresh random vectors: every one must refuse. The
    # bounds (matmul.py) leave these downgrades at 2x (fp8 on an eighth of
    # the inner dimension, rms ~3 e) to ~500x (TF32 in fp32) beyond them, so
    # a pass would take a fluctuation of many standard deviations.
    params = MatmulParams(n=128, dtype=KINDS[kind], seed=3)
    data = downgraded(params, kind)
    checks = [freivalds(params, data) for _ in range(20)]
    passed = [c.detail for c in checks if c.ok]
    assert not passed, f"{kind} passed {len(passed)} of 20: {passed[0]}"
    assert min(c.worst_ratio for c in checks) > 1.5, [round(c.worst_ratio, 2) for c in checks]


def test_a_file_is_checked_as_its_bytes_are(tmp_path: Path) -> None:
    params = MatmulParams(n=300, dtype="bf16", seed=4)
    good = encode_output(params, _exact(params))
    path = tmp_path / "c.bin"
    path.write_bytes(good)
    assert freivalds_file(params, path).ok
    path.write_bytes(downgraded(MatmulParams(n=300, dtype="bf16", seed=4), "fp8_quarter"))
    assert not freivalds_file(params, path).ok
    path.write_bytes(good[:-2])
    assert "expected" in freivalds_file(params, path).detail
