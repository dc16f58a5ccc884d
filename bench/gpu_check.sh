#!/usr/bin/env bash
# make gpu-check: the GPU acceptance run, for short access to a GPU host
# whose Python already holds CUDA torch, transformers, numpy, pytest and
# NVML (an NVIDIA PyTorch image). Nothing is downloaded: what the project
# needs beyond that image comes from .whl/ (make gpu-wheels, run where PyPI
# is reachable), installed with --no-index into a folder of its own.
#
#   make gpu-check                 # on the GPU host; exits non-zero without CUDA
#   GPU_CHECK_CPU=1 make gpu-check # the same steps on the CPU at toy sizes
#
# Steps: install the wheels, generate the stubs, pytest -m gpu, then
# bench/gpu_check.py end to end. Every step runs even if one before failed;
# the exit status is non-zero if any did. GPU_CHECK_OUT names a folder for
# the JSON figures and logs.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SITE=${GPU_SITE:-/tmp/aitbc-gpu-site}
OUT_DIR=${GPU_CHECK_OUT:-}
CPU=${GPU_CHECK_CPU:-}
WHEELS=${GPU_WHEELS:-.whl}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
started=$(date +%s)
failed=()

if compgen -G "$WHEELS/*.whl" >/dev/null; then
    echo "== installing $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into $SITE (no index)"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl \
        || { echo "FAIL: the wheels did not install"; exit 1; }
    export PYTHONPATH="$SITE:$PWD"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

if [ -z "$CPU" ] && ! $PY -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "FAIL: no CUDA device here: make gpu-check needs a GPU host (nvidia-smi working, a CUDA build of torch)."
    echo "      GPU_CHECK_CPU=1 make gpu-check runs the same steps on the CPU."
    exit 2
fi

# The stubs, generated here as `make protos` would (without its mypy plugins,
# which belong to the dev tools). Into a scratch folder first, so a check of
# the generator never clobbers a working tree's stubs.
stubs=$(mktemp -d)
if $PY -m grpc_tools.protoc -I protos --python_out="$stubs" --grpc_python_out="$stubs" protos/aitbc/v1/*.proto; then
    if [ ! -f aitbc/v1/coordinator_pb2.py ]; then
        mkdir -p aitbc/v1 && cp "$stubs"/aitbc/v1/*.py aitbc/v1/ && touch aitbc/v1/__init__.py
    fi
else
    failed+=("stubs")
fi
rm -rf "$stubs"

echo "== versions"
$PY - <<'EOF' || failed+=("imports")
import importlib, platform
print("python", platform.python_version())
for name in ["torch", "numpy", "grpc", "google.protobuf", "transformers", "diffusers", "cryptography", "nacl",
             "structlog", "prometheus_client", "pynvml", "pytest"]:
    mod = importlib.import_module(name)
    print(f"{name:18} {getattr(mod, '__version__', '?'):12} {mod.__file__}")
import torch
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"cuda {torch.version.cuda}: {torch.cuda.get_device_name(0)}, {p.total_memory / 2**30:.0f} GiB, "
          f"{p.multi_processor_count} SMs, capability {p.major}.{p.minor}")
import aitbc.v1.coordinator_pb2, coordinator_svc.__main__, wallet_svc.__main__, miner_svc.__main__  # noqa
EOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,power.limit,clocks.max.sm \
    --format=csv

echo "== pytest -m gpu"
$PY -m pytest -m gpu -p no:cacheprovider -q -rs -s tests/test_gpu_device.py tests/test_miner_host.py \
    ${OUT_DIR:+--junitxml "$OUT_DIR/gpu-tests.xml"} || failed+=("pytest -m gpu")

echo "== end to end"
$PY -m bench.gpu_check ${CPU:+--cpu} ${OUT_DIR:+--json "$OUT_DIR/gpu-check.json"} || failed+=("end to end")

echo "== gpu-check took $(( $(date +%s) - started )) s"
if [ ${#failed[@]} -gt 0 ]; then
    echo "FAILED: ${failed[*]}"
    exit 1
fi
echo "gpu-check passed"
