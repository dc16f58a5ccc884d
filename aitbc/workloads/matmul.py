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

import secrets
from dataclasses import dataclass

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

# Freivalds tolerance per dtype. Each row i of C r is compared with
# A_i . (B r); the bound is TOLERANCE * |A_i| * |B r| / sqrt(n), the typical
# size of that dot product for inputs like ours. Honest rounding errors (of
# the products, and of C to its dtype) are a small multiple of the dtype's
# unit roundoff times that scale, so the factors below sit ~10x above what
# honest CPU runs show (tests/test_matmul_workload.py measures the margin),
# while a fabricated or zeroed C is off by O(1 / TOLERANCE) of it.
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 1e-1}
FREIVALDS_ROUNDS = 8


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


def make_inputs(params: MatmulParams) -> tuple[np.ndarray, np.ndarray]:
    """A and B as float32 arrays whose values are exact in the job's dtype.

    Each 64-bit PCG64 output gives two values: the top 24 bits of each
    32-bit half (little-endian order), as k / 2**23 - 1. Half the generator
    calls and 32-bit arithmetic throughout: both the miner and the
    coordinator pay this on every job, and it is most of the check's cost."""
    n = params.n
    gen = np.random.PCG64(params.seed)
    words = np.asarray(gen.random_raw(n * n), dtype="<u8").view("<u4")
    ints = (words >> np.uint32(8)).view(np.int32)
    vals = ints.astype(np.float32)
    vals *= np.float32(1.0 / (1 << 23))
    vals -= np.float32(1.0)
    vals = round_to_dtype(vals.reshape(2, n, n), params.dtype)
    return vals[0], vals[1]


def decode_output(params: MatmulParams, data: bytes) -> np.ndarray:
    """C as float32 from its little-endian encoding in the job's dtype (every
    fp16 and bf16 value is exact in float32)."""
    if len(data) != params.output_size:
        raise ValueError(f"output is {len(data)} bytes, expected {params.output_size}")
    n = params.n
    if params.dtype == "fp32":
        c = np.frombuffer(data, dtype="<f4")
    elif params.dtype == "fp16":
        c = np.frombuffer(data, dtype="<f2").astype(np.float32)
    else:
        c = (np.frombuffer(data, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    return c.reshape(n, n)


def encode_output(params: MatmulParams, c: np.ndarray) -> bytes:
    """Reference encoding of C (float32 values) in the job's dtype; the
    miner's torch code produces the same bytes."""
    if params.dtype == "fp32":
        return c.astype("<f4").tobytes()
    if params.dtype == "fp16":
        return c.astype("<f2").tobytes()
    return (_round_to_bf16(c.astype(np.float32)).view(np.uint32) >> 16).astype("<u2").tobytes()


def freivalds(params: MatmulParams, data: bytes, rounds: int = FREIVALDS_ROUNDS) -> Check:
    """Check C = A @ B in O(n^2) per round with random +-1 vectors the miner
    cannot predict. A wrong C survives one round with probability <= 1/2
    (far less for a C that is wrong in many places)."""
    try:
        c = decode_output(params, data)
    except ValueError as exc:
        return Check(False, str(exc))
    if not np.isfinite(c).all():
        return Check(False, "output holds NaN or infinity")
    a, b = make_inputs(params)
    n = params.n
    # Random signs the miner cannot predict, from the OS's CSPRNG.
    bits = np.unpackbits(np.frombuffer(secrets.token_bytes(-(-n * rounds // 8)), dtype=np.uint8))[: n * rounds]
    r = (bits.astype(np.float32) * 2 - 1).reshape(n, rounds)
    # float32 products: their rounding (~1e-7 relative) is far inside the
    # smallest tolerance (1e-4), and they run at BLAS speed without copies.
    br = b @ r
    with np.errstate(over="ignore", invalid="ignore"):  # a cheater's absurd C; caught below
        lhs = c @ r
    rhs = a @ br
    scale = np.outer(np.linalg.norm(a, axis=1), np.linalg.norm(br, axis=0)).astype(np.float64) / np.sqrt(n)
    bound = TOLERANCE[params.dtype] * scale + 1e-30
    with np.errstate(all="ignore"):
        ratio = np.abs(lhs.astype(np.float64) - rhs) / bound
    worst = float(ratio.max())
    if not np.isfinite(worst):  # float32 overflow of absurd values: NaN must not pass
        return Check(False, "C's products overflow: its values are far out of range", float("inf"))
    if worst > 1.0:
        row = int(np.unravel_index(int(ratio.argmax()), ratio.shape)[0])
        return Check(False, f"C fails Freivalds' check at row {row} ({worst:.3g}x the tolerance)", worst)
    return Check(True, f"passed {rounds} Freivalds rounds", worst)


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

    def check(self, params: MatmulParams, output: bytes) -> Check:
        return freivalds(params, output)

    def agree(self, params: MatmulParams, a: bytes, b: bytes) -> Check:
        # Each output already passed Freivalds' check, which proves it is
        # A @ B within the dtype's tolerance: two such outputs are the same
        # result even where their rounding differs.
        return Check(True, "both outputs pass Freivalds' check")
