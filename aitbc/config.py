"""Configuration: every option is declared once, with type, default and doc.

Sources, lowest precedence first: the declared default, an env-style file
(the seed guide's /etc/aitbc/miner.conf format: KEY="value" lines, # comments),
the process environment (<PREFIX><KEY>, or the bare KEY for the seed's names),
then command-line flags (--key-name value).
"""

from __future__ import annotations

import argparse
import os
import shlex
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Option:
    key: str
    type: Callable[[str], Any]
    default: Any
    doc: str
    # Read the bare KEY from the environment too (the seed's names).
    bare_env: bool = False


def parse_env_file(path: Path) -> dict[str, str]:
    """Parse KEY=value lines as a shell would quote them. `$(hostname)` is
    expanded because the seed guide's example config uses it."""
    values: dict[str, str] = {}
    for lineno, raw in enumerate(Path(path).read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, rest = line.partition("=")
        if not sep or not key.strip().isidentifier():
            raise ValueError(f"{path}:{lineno}: expected KEY=value, got {raw!r}")
        rest = rest.replace("$(hostname)", socket.gethostname())
        parts = shlex.split(rest, comments=True)
        values[key.strip()] = " ".join(parts)
    return values


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def load(
    options: Sequence[Option],
    *,
    prog: str,
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
    env_prefix: str = "AITBC_",
    config_env: str = "AITBC_CONFIG",
) -> dict[str, Any]:
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(prog=prog, description=f"{prog} (options: flag > env > file > default)")
    parser.add_argument("--config", help=f"env-style config file (env {config_env})")
    for opt in options:
        parser.add_argument(
            "--" + opt.key.lower().replace("_", "-"),
            dest=opt.key,
            default=None,
            help=f"{opt.doc} [env {env_prefix}{opt.key}; default {opt.default!r}]",
        )
    args = parser.parse_args(argv)
    file_values: dict[str, str] = {}
    config_path = args.config or environ.get(config_env)
    if config_path:
        file_values = parse_env_file(Path(config_path))
    result: dict[str, Any] = {}
    for opt in options:
        raw: str | None = getattr(args, opt.key)
        if raw is None:
            raw = environ.get(env_prefix + opt.key)
        if raw is None and opt.bare_env:
            raw = environ.get(opt.key)
        if raw is None:
            raw = file_values.get(opt.key)
        if raw is None:
            result[opt.key] = opt.default
            continue
        try:
            result[opt.key] = opt.type(raw)
        except ValueError as exc:
            parser.error(f"{opt.key}: {exc}")
    return result
