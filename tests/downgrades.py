"""Matmul answers computed at a lower precision than the job asks for: what
a miner saves work with and hopes Freivalds' check lets through. Each
returns C encoded in the job's dtype, as a miner would upload it."""

from __future__ import annotations

import numpy as np
import torch

from aitbc.workloads.matmul import MatmulParams, encode_output, make_inputs, round_to_dtype

# kind -> the job's dtype it is a downgrade of
KINDS = {
    "tf32": "fp32",  # inputs rounded to TF32's 10-bit mantissa, fp32 accumulation (cuBLAS with TF32 on)
    "fp16_in_fp32": "fp32",  # an fp32 job multiplied in fp16
    "bf16_in_fp32": "fp32",
    "fp8_quarter": "bf16",  # a quarter of the inner dimension in fp8 e4m3
    "fp8_eighth": "bf16",  # an eighth
}


def _tf32(x: np.ndarray) -> np.ndarray:
    bits = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + np.uint64(0xFFF) + ((bits >> np.uint64(13)) & np.uint64(1))) >> np.uint64(13) << np.uint64(13)
    return rounded.astype(np.uint32).view(np.float32)


def _fp8(x: np.ndarray) -> np.ndarray:
    return torch.from_numpy(np.ascontiguousarray(x)).to(torch.float8_e4m3fn).to(torch.float32).numpy()


def downgraded(params: MatmulParams, kind: str) -> bytes:
    assert KINDS[kind] == params.dtype, (kind, params.dtype)
    a, b = make_inputs(params)
    if kind == "tf32":
        c = _tf32(a) @ _tf32(b)
    elif kind in ("fp16_in_fp32", "bf16_in_fp32"):
        low = kind.split("_")[0]
        c = round_to_dtype(a, low) @ round_to_dtype(b, low)
    else:
        m = params.n // (4 if kind == "fp8_quarter" else 8)
        c = _fp8(a[:, :m]) @ _fp8(b[:m]) + a[:, m:] @ b[m:]
    return encode_output(params, c)
