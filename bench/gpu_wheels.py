"""make gpu-wheels: download, here, the wheels a GPU host needs beyond what an
NVIDIA PyTorch image holds, for Python 3.12 on manylinux x86_64, into .whl/
(ignored by git). `make gpu-check` installs them there with --no-index.

Versions come from requirements.txt, so the GPU host runs what CI tests.
Left out on purpose: torch (the image's CUDA build), numpy, transformers and
the rest of the image's own stack, and the 80 MB packaged MiniLM (embed is
not part of the GPU check)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEST = ROOT / ".whl"
# Ours at our pins: the generated stubs check grpcio and protobuf versions.
WHEELS = [
    "grpcio", "grpcio-tools", "protobuf", "grpcio-health-checking", "grpcio-reflection", "grpcio-status",
    "googleapis-common-protos", "cryptography", "cffi", "pycparser", "PyNaCl", "structlog", "diffusers",
    "importlib_metadata",
]  # fmt: skip
PLATFORMS = ["manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_24_x86_64", "manylinux_2_26_x86_64",
             "manylinux_2_27_x86_64", "manylinux_2_28_x86_64", "manylinux_2_34_x86_64"]  # fmt: skip
LIMIT_BYTES = 60 * 2**20


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(requirements: Path = ROOT / "requirements.txt") -> dict[str, str]:
    out = {}
    for line in requirements.read_text().splitlines():
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep:
            out[canonical(name)] = version.strip()
    return out


def requirements() -> list[str]:
    pinned = pins()
    missing = [w for w in WHEELS if canonical(w) not in pinned]
    if missing:
        raise SystemExit(f"not pinned in requirements.txt: {', '.join(missing)}")
    return [f"{w}=={pinned[canonical(w)]}" for w in WHEELS]


def main() -> int:
    DEST.mkdir(exist_ok=True)
    for old in DEST.glob("*.whl"):
        old.unlink()  # one version of each: two stop the install
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
           "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp", "-d", str(DEST)]  # fmt: skip
    for p in PLATFORMS:
        cmd += ["--platform", p]
    subprocess.run([*cmd, *requirements()], check=True)
    size = sum(w.stat().st_size for w in DEST.glob("*.whl"))
    print(f"{len(list(DEST.glob('*.whl')))} wheels, {size / 2**20:.1f} MiB in {DEST}")
    if size > LIMIT_BYTES:
        print(f"over the {LIMIT_BYTES / 2**20:.0f} MiB a GPU host's copy may carry", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
