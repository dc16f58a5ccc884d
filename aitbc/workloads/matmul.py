"""matmul: C = A @ B, the seed's torch_bench made verifiable.

What both sides need lives here, so the coordinator and the miner agree by
construction: parameter checks, the inputs made from the job's seed, the
price measure, the output encoding and Freivalds' check. The torch run code
is the miner's (miner_svc/_run_matmul.py); the coordinator never imports it.

Inputs are made on the CPU from raw PCG64 output (bits, not numpy's
distribution code, which NumPy does not promise to keep stable), mapped
exactly to k / 2**23 in [-1, 1), then rounded to the job's dtype. Every value
is representable in float32, so moving them to any device and casting is
exact, and a GPU miner multiplies the very numbers the coordinator
regenerates.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aitbc.errors import InvalidArgument
from aitbc.v1 import coordinator_pb2, workloads_pb2
from aitbc.workloads.base import Check, Workload

NAME = "matmul"
# What any party accepts (a 1 GiB fp32 result); a coordinator takes less by
# its MAX_RESULT_BYTES, 64 MiB (n = 4096 in fp32) unless its operator raises it.
MAX_N = 16384
MAX_REPEATS = 100
DTYPES = ("fp32", "fp16", "bf16")
ITEMSIZE = {"fp32": 4, "fp16": 2, "bf16": 2}

# Freivalds' check, in float64, block by block (see freivalds_file): for
# each row i of C and each random +-1 vector r, the residual
# (C r)_i - A_i . (B r) is compared with the scale s_i = |A_i| |B|_F / sqrt(n),
# the typical size of (C r)_i, which depends on neither C nor r.
#
# What an honest miner's C may be off by, relative to that scale, is the
# "unit error" e(n) = u + u32 * sqrt(n): u, the unit roundoff of the job's
# dtype, from rounding C to it (fp32 2^-24, fp16 2^-11, bf16 2^-8), and
# u32 * sqrt(n), the fp32 accumulation of n products with random-walk
# growth (cuBLAS and CPU BLAS accumulate fp16 and bf16 products in fp32).
# Random rounding errors of C add over the row with random signs, so one
# residual is Gaussian with a standard deviation of about 0.41 e (0.41 =
# the rms relative error of round-to-nearest, ~0.29 ulp over a mantissa
# in [1, 2); and 1/sqrt(6) for a recursive fp32 sum, the worst ordering).
# Two bounds, each >= 3x what honest arithmetic reaches:
#   - every residual within MAX_FACTOR e: the largest of up to 10^6 honest
#     residuals is ~5 sd = 2.1 e, a factor 3.9 below 8 e. Catches a wrong
#     element, row or block.
#   - the rms residual within RMS_FACTOR e, from n = RMS_MIN_N up (below
#     it C has too few elements for their rms to settle): honest C sits at
#     0.41-0.44 e, a factor 3.4 below 1.5 e. The rms is C's relative
#     Frobenius error, what a downgrade spread thinly over all of C cannot
#     hide: inputs rounded to tf32, fp16 or bf16 in an fp32 job (500 e and
#     more), fp8 e4m3 on a share p of a bf16 job's inner dimension
#     (~8.7 sqrt(p) e: refused from p ~ 1/30 up), fp16 accumulation in a
#     bf16 job one product at a time from n ~ 2048 up.
# Not refused: a bf16 job multiplied as fp16 (its inputs are exact in fp16
# and the products accumulate in fp32 as before: no downgrade), and fp16
# accumulation in blocks of 16, as tensor cores do, which stays within
# bf16's own rounding until n ~ 22000 (DECISIONS.md). Measured: honest CPU
# runs (tests/test_matmul_workload.py) stay below 0.3 of both bounds, H200
# cuBLAS runs below 0.25 of the worst-residual bound (BENCHMARKS.md).
UNIT_ROUNDOFF = {"fp32": 2.0**-24, "fp16": 2.0**-11, "bf16": 2.0**-8}
ACCUMULATION_ROUNDOFF = 2.0**-24
MAX_FACTOR = 8.0
RMS_FACTOR = 1.5
RMS_MIN_N = 32
# Random vectors per check. A wrong C passes one round with probability at
# most 1/2 (errors that cancel under a +-1 vector), so 20 rounds bound any
# wrong C's chance to 2^-20 < 1e-6. Small n gets more rounds, so that the
# rms is taken over at least MIN_RESIDUALS residuals.
FREIVALDS_ROUNDS = 20
MIN_RESIDUALS = 4096
# float32 elements of A, B or C held per block (2 MiB): the check's memory
# is a few blocks, whatever n.
BLOCK_ELEMENTS = 2**19


def unit_error(dtype: str, n: int) -> float:
    """e(n): what an honest C may be off by, relative to the check's scale."""
    return UNIT_ROUNDOFF[dtype] + ACCUMULATION_ROUNDOFF * math.sqrt(n)


def rounds_for(n: int) -> int:
    return max(FREIVALDS_ROUNDS, -(-MIN_RESIDUALS // n))


def block_rows(n: int) -> int:
    return max(1, BLOCK_ELEMENTS // n)


def check_memory(n: int) -> int:
    """Bytes the check of one n x n result holds at most: B r and r, and a
    row block of A and of C in float64 with their float32 and raw copies
    (measured under 10 blocks)."""
    return 12 * block_rows(n) * n * 4 + 4 * n * rounds_for(n) * 8 + 2**20


@dataclass(frozen=True)
class MatmulParams:
    n: int
    dtype: str
    seed: int
    repeats: int = 1

    def validate(self) -> MatmulParams:
        if not 1 <= self.n <= MAX_N:
            raise InvalidArgument(f"n must be in 1..{MAX_N}, got {self.n}", field="spec.matmul.n")
        if self.dtype not in DTYPES:
            raise InvalidArgument(
                f"dtype must be one of DTYPE_FP32, DTYPE_FP16, DTYPE_BF16, got {self.dtype!r}",
                field="spec.matmul.dtype",
            )
        if not 0 <= self.seed < 2**64:
            raise InvalidArgument("seed must fit in 64 bits", field="spec.matmul.seed")
        if not 1 <= self.repeats <= MAX_REPEATS:
            raise InvalidArgument(
                f"repeats must be in 1..{MAX_REPEATS} (0 means 1), got {self.repeats}",
                field="spec.matmul.repeats",
            )
        return self

    @property
    def flops(self) -> int:
        """FLOPs of the one product that is verified, and so paid for."""
        return 2 * self.n**3

    @property
    def output_size(self) -> int:
        return self.n * self.n * ITEMSIZE[self.dtype]


def _round_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round float32 to the nearest bfloat16 (ties to even), kept as float32."""
    bits = x.view(np.uint32).astype(np.uint64)
    sixteen = np.uint64(16)
    rounded = (bits + np.uint64(0x7FFF) + ((bits >> sixteen) & np.uint64(1))) >> sixteen << sixteen
    return rounded.astype(np.uint32).view(np.float32)


def round_to_dtype(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "fp32":
        return x
    if dtype == "fp16":
        return x.astype(np.float16).astype(np.float32)
    return _round_to_bf16(x)


def _values(params: MatmulParams, start: int, count: int) -> np.ndarray:
    """Values start .. start + count of the job's input stream (A row-major,
    then B), as float32 exact in the job's dtype.

    Each 64-bit PCG64 output gives two values: the top 24 bits of each
    32-bit half (little-endian order), as k / 2**23 - 1. Half the generator
    calls and 32-bit arithmetic throughout: both the miner and the
    coordinator pay this on every job, and it is most of the check's cost.
    Any stretch of the stream is made on its own (PCG64 jumps ahead in
    O(log n) with advance()), so the checker holds a block, not A and B."""
    first_word = start // 2
    gen = np.random.PCG64(params.seed)
    gen.advance(first_word)
    words = np.asarray(gen.random_raw(-(-(start + count) // 2) - first_word), dtype="<u8")
    skip = start - 2 * first_word
    ints = (words.view("<u4")[skip : skip + count] >> np.uint32(8)).view(np.int32)
    vals = ints.astype(np.float32)
    vals *= np.float32(1.0 / (1 << 23))
    vals -= np.float32(1.0)
    return round_to_dtype(vals, params.dtype)


def input_rows(params: MatmulParams, matrix: str, first: int, stop: int) -> np.ndarray:
    """Rows first .. stop of A or B, byte for byte what make_inputs gives."""
    n = params.n
    base = 0 if matrix == "A" else n * n
    return _values(params, base + first * n, (stop - first) * n).reshape(stop - first, n)


def make_inputs(params: MatmulParams) -> tuple[np.ndarray, np.ndarray]:
    """A and B as float32 arrays whose values are exact in the job's dtype."""
    n = params.n
    vals = _values(params, 0, 2 * n * n).reshape(2, n, n)
    return vals[0], vals[1]


_WIRE_DTYPE = {"fp32": "<f4", "fp16": "<f2", "bf16": "<u2"}


def _to_float64(params: MatmulParams, raw: np.ndarray) -> np.ndarray:
    """C's little-endian encoding in the job's dtype as float64 (exact)."""
    if params.dtype == "bf16":
        raw = (raw.astype(np.uint32) << np.uint32(16)).view(np.float32)
    return raw.astype(np.float64)


def decode_output(params: MatmulParams, data: bytes) -> np.ndarray:
    """C as float32 from its little-endian encoding in the job's dtype (every
    fp16 and bf16 value is exact in float32)."""
    if len(data) != params.output_size:
        raise ValueError(f"output is {len(data)} bytes, expected {params.output_size}")
    raw = np.frombuffer(data, dtype=_WIRE_DTYPE[params.dtype])
    return _to_float64(params, raw).astype(np.float32).reshape(params.n, params.n)


def encode_output(params: MatmulParams, c: np.ndarray) -> bytes:
    """Reference encoding of C (float32 values) in the job's dtype; the
    miner's torch code produces the same bytes."""
    if params.dtype == "fp32":
        return c.astype("<f4").tobytes()
    if params.dtype == "fp16":
        return c.astype("<f2").tobytes()
    return (_round_to_bf16(c.astype(np.float32)).view(np.uint32) >> 16).astype("<u2").tobytes()


@dataclass(frozen=True)
class Residuals:
    """What Freivalds' check saw, in units of e(n) (see unit_error)."""

    e: float
    rounds: int
    # Largest |(C r)_i - A_i (B r)| / s_i over all rows and rounds, and its row.
    worst: float
    worst_row: int
    # Root mean square of the same over all rows and rounds.
    rms: float
    # C holds a NaN or an infinity (nothing else was computed).
    nonfinite: bool = False

    # Whether the rms is held to RMS_FACTOR (n >= RMS_MIN_N).
    rms_bounded: bool = True

    @property
    def fraction(self) -> float:
        """The larger of the two, as a fraction of its bound (< 1 passes)."""
        return max(self.worst / MAX_FACTOR, self.rms / RMS_FACTOR if self.rms_bounded else 0.0)


def residuals(params: MatmulParams, read_c: Callable[[int, int], np.ndarray], rounds: int = 0) -> Residuals:
    """Freivalds' check in O(n^2) per round with random +-1 vectors the miner
    cannot predict, one row block at a time: B r from B's row blocks, then
    per block of rows of A and C (read_c(first, stop) gives C's rows as
    float64). float64 throughout, so the check adds no rounding of its own
    that the tolerance would have to cover (B r is even exact)."""
    n = params.n
    rounds = rounds or rounds_for(n)
    e = unit_error(params.dtype, n)
    bits = np.unpackbits(np.frombuffer(secrets.token_bytes(-(-n * rounds // 8)), dtype=np.uint8))[: n * rounds]
    r = bits.astype(np.float64).reshape(n, rounds) * 2.0 - 1.0
    step = block_rows(n)
    br = np.empty((n, rounds))
    b_squares = 0.0
    for first in range(0, n, step):
        stop = min(n, first + step)
        block = input_rows(params, "B", first, stop).astype(np.float64)
        br[first:stop] = block @ r
        b_squares += float(np.einsum("ij,ij->", block, block))
    norm_b = math.sqrt(b_squares / n)
    worst, worst_row, squares = 0.0, 0, 0.0
    for first in range(0, n, step):
        stop = min(n, first + step)
        c = read_c(first, stop)
        if not np.isfinite(c).all():
            return Residuals(e, rounds, math.inf, first, math.inf, nonfinite=True)
        a = input_rows(params, "A", first, stop).astype(np.float64)
        scale = np.sqrt(np.einsum("ij,ij->i", a, a)) * norm_b * e
        # A zero scale (n = 1 and a zero input) allows exactly zero.
        ratio = np.abs(c @ r - a @ br) / np.maximum(scale, 1e-300)[:, None]
        block_worst = float(ratio.max())
        if block_worst > worst:
            worst, worst_row = block_worst, first + int(ratio.max(axis=1).argmax())
        squares += float(np.einsum("ij,ij->", ratio, ratio))
    return Residuals(e, rounds, worst, worst_row, math.sqrt(squares / (n * rounds)), rms_bounded=n >= RMS_MIN_N)


def _judge_residuals(params: MatmulParams, res: Residuals) -> Check:
    if res.nonfinite:
        return Check(False, "output holds NaN or infinity", math.inf)
    if not res.worst <= MAX_FACTOR:  # also NaN
        return Check(
            False,
            f"C fails Freivalds' check at row {res.worst_row}: off by {res.worst:.3g} e, above the {MAX_FACTOR:g} e "
            f"that {params.dtype} arithmetic allows (e = {res.e:.3g} of the row's scale)",
            res.fraction,
        )
    if res.rms_bounded and not res.rms <= RMS_FACTOR:
        return Check(
            False,
            f"C is off by {res.rms:.3g} e on average, above the {RMS_FACTOR:g} e of {params.dtype} arithmetic "
            f"(e = {res.e:.3g}): computed at a lower precision than {params.dtype}",
            res.fraction,
        )
    return Check(
        True, f"passed {res.rounds} Freivalds rounds (worst {res.worst:.2g} e, rms {res.rms:.2g} e)", res.fraction
    )


def freivalds(params: MatmulParams, data: bytes, rounds: int = 0) -> Check:
    """Check C, given as its encoded bytes."""
    if len(data) != params.output_size:
        return Check(False, f"output is {len(data)} bytes, expected {params.output_size}")
    n, wire = params.n, np.dtype(_WIRE_DTYPE[params.dtype])

    def read_c(first: int, stop: int) -> np.ndarray:
        raw = np.frombuffer(data, dtype=wire, count=(stop - first) * n, offset=first * n * wire.itemsize)
        return _to_float64(params, raw).reshape(stop - first, n)

    return _judge_residuals(params, residuals(params, read_c, rounds))


def freivalds_file(params: MatmulParams, path: Path, rounds: int = 0) -> Check:
    """Check C from a file, one row block at a time: the check holds a few
    blocks whatever n is. Plain reads, not a memory map: mapped pages count
    in the process's resident set until the kernel evicts them, so four
    64 MiB results checked at once would add 256 MiB to it."""
    size = path.stat().st_size
    if size != params.output_size:
        return Check(False, f"output is {size} bytes, expected {params.output_size}")
    n, wire = params.n, np.dtype(_WIRE_DTYPE[params.dtype])
    with path.open("rb") as f:

        def read_c(first: int, stop: int) -> np.ndarray:
            f.seek(first * n * wire.itemsize)
            count = (stop - first) * n
            raw = np.fromfile(f, dtype=wire, count=count)
            if raw.size != count:
                raise ValueError(f"{path} was cut short while being checked")
            return _to_float64(params, raw).reshape(stop - first, n)

        return _judge_residuals(params, residuals(params, read_c, rounds))


DTYPE_NAMES = {workloads_pb2.DTYPE_FP32: "fp32", workloads_pb2.DTYPE_FP16: "fp16", workloads_pb2.DTYPE_BF16: "bf16"}


class Matmul(Workload[MatmulParams]):
    name = NAME
    unit = "MFLOP"
    self_checking = True
    size_field = "spec.matmul.n"

    def params(self, spec: coordinator_pb2.JobSpec) -> MatmulParams:
        p = spec.matmul
        return MatmulParams(n=p.n, dtype=DTYPE_NAMES.get(p.dtype, ""), seed=p.seed, repeats=p.repeats or 1).validate()

    def work_units(self, params: MatmulParams) -> int:
        # The one product that comes back and is checked: repeats cannot be
        # verified (a miner may skip them and still return the right C), so
        # they are not paid for.
        return -(-params.flops // 10**6)

    def run_seconds(self, params: MatmulParams, gpu: bool) -> float:
        # Every repeat runs, paid or not; half precision on a CPU without
        # native support is about ten times slower than fp32.
        mflop = params.flops * (params.repeats + 1) / 1e6
        # 1 TFLOP/s on a GPU; 10 GFLOP/s fp32, 1 GFLOP/s half on a CPU.
        per_mflop = 1e-6 if gpu else 1e-4 if params.dtype == "fp32" else 1e-3
        # Making A and B: 2n^2 values at 20 million a second.
        return mflop * per_mflop + 2 * params.n**2 / 2e7

    def max_output_size(self, params: MatmulParams) -> int:
        return params.output_size

    def exact_output_size(self, params: MatmulParams) -> int | None:
        return params.output_size

    def check_memory(self, params: MatmulParams, size: int) -> int:
        return check_memory(params.n)

    def check(self, params: MatmulParams, output: bytes) -> Check:
        return freivalds(params, output)

    def check_file(self, params: MatmulParams, path: Path) -> Check:
        return freivalds_file(params, path)

    def agree(self, params: MatmulParams, a: bytes, b: bytes) -> Check:
        # Each output already passed Freivalds' check, which proves it is
        # A @ B within the dtype's tolerance: two such outputs are the same
        # result even where their rounding differs.
        return Check(True, "both outputs pass Freivalds' check")

    def agree_files(self, params: MatmulParams, a: Path, b: Path) -> Check:
        return self.agree(params, b"", b"")
