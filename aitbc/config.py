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
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import aitbc

# sysexits.h: a supervisor (systemd's RestartPreventExitStatus=) can tell
# these from a crash and stop restarting what a restart cannot fix.
EX_CONFIG = 78  # the configuration is wrong: the owner must edit it
EX_NOPERM = 77  # the network refused this token or key: the owner must act


def config_error(message: str) -> NoReturn:
    """Exit EX_CONFIG with the message (which should name the fix) on stderr."""
    sys.stderr.write(message.rstrip("\n") + "\n")
    sys.stderr.flush()
    raise SystemExit(EX_CONFIG)


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


def _warn_unknown(prog: str) -> Callable[[Path, list[str]], None]:
    def warn(path: Path, keys: list[str]) -> None:
        sys.stderr.write(f"{prog}: warning: {path}: {', '.join(keys)} unknown here, ignored\n")

    return warn


def load(
    options: Sequence[Option],
    *,
    prog: str,
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
    env_prefix: str = "AITBC_",
    config_env: str = "AITBC_CONFIG",
    epilog: str | None = None,
    on_unknown: Callable[[Path, list[str]], None] | None = None,
) -> dict[str, Any]:
    """The options' values. A value that does not parse, or a config file
    that cannot be read, exits EX_CONFIG with the key and the reason; keys
    in the file that no option declares go to on_unknown (default: a
    warning on stderr), so a typo is not silently ignored."""
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog=prog,
        description=f"{prog} (options: flag > env > file > default)",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"{prog} {aitbc.__version__}")
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
        try:
            file_values = parse_env_file(Path(config_path))
        except OSError as exc:
            parser.exit(EX_CONFIG, f"{prog}: error: cannot read the config file {config_path}: {exc.strerror}\n")
        except ValueError as exc:
            parser.exit(EX_CONFIG, f"{prog}: error: {exc}\n")
        unknown = sorted(set(file_values) - {opt.key for opt in options})
        if unknown:
            (on_unknown or _warn_unknown(prog))(Path(config_path), unknown)
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
            parser.exit(EX_CONFIG, f"{prog}: error: {opt.key}={raw!r}: {exc}\n")
    return result
