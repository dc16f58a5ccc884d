"""How far honest matmul results sit inside Freivalds' bounds, and how far
a precision downgrade sits outside them, on the device at hand.

    python -m bench.freivalds_margins --device cuda --sizes 4096,8192,16384

For each dtype and n: the miner's own run_matmul (TF32 off) on the device,
then the coordinator's check of its output (aitbc.workloads.matmul), a few
times with fresh random vectors: the worst residual and the rms residual in
units of e(n), and the larger of the two as a fraction of its bound (the
bounds are meant to sit >= 3x above honest runs: a fraction < 1/3). With
--downgrades, an fp32 job multiplied with TF32 on, as cuBLAS does when it is
allowed to, must be refused. One line of JSON per measurement."""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from aitbc.workloads.matmul import MatmulParams, freivalds_file
from miner_svc._run_matmul import run_matmul


def measure(params: MatmulParams, device: str, path: Path, tries: int, label: str) -> dict[str, object]:
    checks = []
    started = time.perf_counter()
    for _ in range(tries):
        checks.append(freivalds_file(params, path))
    seconds = (time.perf_counter() - started) / tries
    worst = max(checks, key=lambda c: c.worst_ratio)
    return {
        "run": label,
        "device": device,
        "n": params.n,
        "dtype": params.dtype,
        "passed": sum(c.ok for c in checks),
        "tries": tries,
        "worst_fraction": round(worst.worst_ratio, 4),
        "detail": worst.detail,
        "check_seconds": round(seconds, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sizes", default="4096,8192")
    parser.add_argument("--dtypes", default="fp32,fp16,bf16")
    parser.add_argument("--tries", type=int, default=3)
    parser.add_argument("--downgrades", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.bin"
        for n in (int(s) for s in args.sizes.split(",")):
            for dtype in args.dtypes.split(","):
                params = MatmulParams(n=n, dtype=dtype, seed=n + 11)
                run_matmul(params, args.device, path)
                print(json.dumps(measure(params, args.device, path, args.tries, "honest")), flush=True)
            if args.downgrades:
                # run_matmul switches TF32 off; a miner that skips that line
                # gets cuBLAS's TF32 products in an fp32 job.
                params = MatmulParams(n=n, dtype="fp32", seed=n + 12)
                path.write_bytes(_tf32_product(params, args.device))
                print(json.dumps(measure(params, args.device, path, args.tries, "tf32 in fp32")), flush=True)


def _tf32_product(params: MatmulParams, device: str) -> bytes:
    import torch

    from aitbc.workloads.matmul import make_inputs

    a, b = (torch.from_numpy(x).to(device) for x in make_inputs(params))
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        c = (a @ b).cpu().contiguous().numpy()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False
    return bytes(c.astype("<f4").tobytes())


if __name__ == "__main__":
    main()
