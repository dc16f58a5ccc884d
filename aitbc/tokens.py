"""`python -m aitbc.tokens`: issue, revoke and list bearer tokens.

Edits the principals file the services read (only token hashes are stored;
a new token is printed once). Running services pick changes up within a
second.

  python -m aitbc.tokens issue --file var/dev/principals.json --name alice --role client \\
      --address ait_... [--expires-in 30d]
  python -m aitbc.tokens issue ... --role miner --miner-id rig-7 --address ait_...
  python -m aitbc.tokens revoke --file var/dev/principals.json --name alice
  python -m aitbc.tokens list --file var/dev/principals.json
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from aitbc.addresses import check_address
from aitbc.audit import audit
from aitbc.auth import ROLE_NAMES, Principal, hash_token, new_token, read_principals, write_principals
from aitbc.errors import InvalidArgument
from aitbc.logs import setup_logging

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    m = re.fullmatch(r"(\d+)([smhd])", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"expected a duration like 90s, 15m, 12h or 30d, got {text!r}")
    return int(m.group(1)) * UNITS[m.group(2)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m aitbc.tokens", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = ap.add_subparsers(dest="command", required=True)
    issue = sub.add_parser("issue", help="make a token for a new or existing name")
    revoke = sub.add_parser("revoke", help="remove every token of a name")
    listing = sub.add_parser("list", help="names, roles and expiry (never tokens)")
    for parser in (issue, revoke, listing):
        parser.add_argument("--file", type=Path, required=True, help="the principals file the services read")
    issue.add_argument("--name", required=True)
    issue.add_argument("--role", required=True, choices=sorted(ROLE_NAMES))
    issue.add_argument("--address", default="", help="wallet address (clients pay from it, miners are paid to it)")
    issue.add_argument("--miner-id", default="", help="for miners: the only miner id the token may speak for")
    issue.add_argument("--expires-in", type=parse_duration, help="e.g. 30d; default: never")
    revoke.add_argument("--name", required=True)
    args = ap.parse_args(argv)
    setup_logging("tokens")  # audit lines to stderr; stdout carries only the token
    entries = read_principals(args.file) if args.file.exists() else {}
    if args.command == "list":
        for who in sorted(entries.values(), key=lambda e: (e.role, e.name)):
            when = datetime.fromtimestamp(who.expires, UTC).isoformat(timespec="seconds") if who.expires else "never"
            state = "EXPIRED" if who.expired else "valid"
            print(f"{who.role:12} {who.name:24} {state:8} expires {when} {who.miner_id} {who.address}")
        return 0
    if args.command == "revoke":
        kept = {h: p for h, p in entries.items() if p.name != args.name}
        if len(kept) == len(entries):
            print(f"no token of {args.name!r} in {args.file}", file=sys.stderr)
            return 1
        write_principals(args.file, kept)
        audit("token_revoked", name=args.name, count=len(entries) - len(kept))
        print(f"revoked {len(entries) - len(kept)} token(s) of {args.name}")
        return 0
    if args.address:
        try:
            check_address(args.address, field="--address")
        except InvalidArgument as exc:
            print(exc.message, file=sys.stderr)
            return 2
    if args.role == "miner" and not args.miner_id:
        print("a miner token needs --miner-id", file=sys.stderr)
        return 2
    owner = next((p.name for p in entries.values() if args.miner_id and p.miner_id == args.miner_id), args.name)
    if owner != args.name:
        print(f"miner id {args.miner_id!r} belongs to {owner!r}: one name per miner id", file=sys.stderr)
        return 2
    token = new_token()
    expires = time.time() + args.expires_in if args.expires_in else 0.0
    entries[hash_token(token)] = Principal(args.name, args.role, args.address, args.miner_id, expires)
    write_principals(args.file, entries)
    audit("token_issued", name=args.name, role=args.role, miner_id=args.miner_id or None, expires=expires)
    print(token)
    return 0


if __name__ == "__main__":
    sys.exit(main())
