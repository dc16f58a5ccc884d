"""`aitbc`: the command-line client. Keys, balance and history, submitting
each workload with a live progress display until it is settled, watching,
fetching results, cancelling, listing jobs, and checking a receipt and its
settlement offline with the public keys alone.

Connection settings come from flags or the environment (AITBC_COORDINATOR,
AITBC_WALLET, AITBC_TOKEN, AITBC_KEY_FILE, AITBC_TLS_CA/CERT/KEY); `source
var/dev/tokens.env` sets what `make run` made.

Exit codes: 0 done (a submitted job settled); 1 the job ended without a
verified result; 2 bad usage; 3 the service refused or was unreachable
(the gRPC status is printed); 4 a receipt or result failed verification.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import secrets
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC
from pathlib import Path
from typing import Any, TextIO

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from aitbc import __version__, crypto
from aitbc.addresses import address_of
from aitbc.auth import auth_metadata
from aitbc.errors import InvalidArgument
from aitbc.rpc import channel, error_reason, retry_after
from aitbc.signed import open_signed, seal
from aitbc.tls import TlsConfig
from aitbc.v1 import coordinator_pb2 as cpb
from aitbc.v1 import coordinator_pb2_grpc, signing_pb2, wallet_pb2, wallet_pb2_grpc, workloads_pb2

EXIT_UNSETTLED, EXIT_USAGE, EXIT_RPC, EXIT_UNVERIFIED = 1, 2, 3, 4
UAIT = 1_000_000
# How long `submit` asks again a coordinator that answers UNAVAILABLE.
SUBMIT_RETRY_SECS = 120.0
TERMINAL = {cpb.JOB_STATE_SETTLED, cpb.JOB_STATE_FAILED, cpb.JOB_STATE_CANCELLED, cpb.JOB_STATE_EXPIRED}
DTYPES = {"fp32": workloads_pb2.DTYPE_FP32, "fp16": workloads_pb2.DTYPE_FP16, "bf16": workloads_pb2.DTYPE_BF16}


class Failed(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def ait(uait: int) -> str:
    return f"{uait / UAIT:,.6f} AIT"


def state_name(state: int) -> str:
    return cpb.JobState.Name(state).removeprefix("JOB_STATE_")  # type: ignore[arg-type]


def verdict_name(verdict: int) -> str:
    return cpb.Verdict.Name(verdict).removeprefix("VERDICT_")  # type: ignore[arg-type]


class Client:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        tls = TlsConfig(
            Path(args.tls_cert) if args.tls_cert else None,
            Path(args.tls_key) if args.tls_key else None,
            Path(args.tls_ca) if args.tls_ca else None,
        )
        self._coord = channel(args.coordinator, tls)
        self._wallet = channel(args.wallet, tls)
        self.coord = coordinator_pb2_grpc.CoordinatorServiceStub(self._coord)
        self.admin = coordinator_pb2_grpc.CoordinatorAdminServiceStub(self._coord)
        self.wallet = wallet_pb2_grpc.WalletServiceStub(self._wallet)

    @property
    def md(self) -> Any:
        if not self.args.token:
            raise Failed("no token: pass --token or set AITBC_TOKEN (make run writes var/dev/tokens.env)", EXIT_USAGE)
        return auth_metadata(self.args.token)

    async def close(self) -> None:
        await self._coord.close()
        await self._wallet.close()


def key_path(args: argparse.Namespace) -> Path:
    return Path(args.key_file).expanduser()


def load_key(args: argparse.Namespace) -> crypto.KeyPair:
    path = key_path(args)
    if not path.exists():
        raise Failed(f"no key at {path}: run `aitbc keys create`", EXIT_USAGE)
    try:
        return crypto.load_or_create_key(path)
    except (PermissionError, ValueError) as exc:
        raise Failed(str(exc), EXIT_USAGE) from None


def my_address(args: argparse.Namespace) -> str:
    return str(getattr(args, "address", None) or address_of(load_key(args).public_key))


# -- commands ---------------------------------------------------------------


def cmd_keys(args: argparse.Namespace, out: TextIO) -> int:
    path = key_path(args)
    if args.action == "create":
        if path.exists() and not args.force:
            raise Failed(f"{path} exists (its address: {address_of(load_key(args).public_key)}); --force replaces it",
                         EXIT_USAGE)  # fmt: skip
        key = crypto.KeyPair.generate()
        crypto.save_key(path, key)
        print(f"key      {path} (mode 600)", file=out)
    key = load_key(args)
    print(f"address  {address_of(key.public_key)}", file=out)
    print(f"public   {key.public_key.hex()}", file=out)
    return 0


async def cmd_balance(c: Client, args: argparse.Namespace, out: TextIO) -> int:
    address = my_address(args)
    b = await c.wallet.GetBalance(wallet_pb2.GetBalanceRequest(address=address), metadata=c.md, timeout=10)
    print(f"{address}\navailable {ait(b.available)}\nheld      {ait(b.held)}", file=out)
    return 0


async def cmd_history(c: Client, args: argparse.Namespace, out: TextIO) -> int:
    address = my_address(args)
    resp = await c.wallet.ListTransactions(
        wallet_pb2.ListTransactionsRequest(address=address, page_size=args.limit), metadata=c.md, timeout=10
    )
    rows: list[tuple[str, ...]] = [("TIME", "KIND", "AVAILABLE", "HELD", "JOB", "COUNTERPARTY")]
    for t in resp.transactions:
        rows.append((
            t.create_time.ToDatetime(UTC).strftime("%Y-%m-%d %H:%M:%S"),
            wallet_pb2.TransactionKind.Name(t.kind).removeprefix("TRANSACTION_KIND_").lower(),
            f"{t.available_delta / UAIT:+,.6f}", f"{t.held_delta / UAIT:+,.6f}", t.job_id or "-",
            t.counterparty or "-",
        ))  # fmt: skip
    table(rows, out)
    return 0


async def cmd_transfer(c: Client, args: argparse.Namespace, out: TextIO) -> int:
    key = load_key(args)
    amount = round(args.amount * UAIT)
    if amount <= 0:
        raise Failed("the amount must be positive", EXIT_USAGE)
    body = signing_pb2.TransferBody(
        network_id=args.network_id, from_address=address_of(key.public_key), to_address=args.to, amount=amount,
        request_id=args.request_id or secrets.token_hex(8), memo=args.memo,
    )  # fmt: skip
    signed = seal(body, crypto.TRANSFER_DOMAIN, key)
    resp = await c.wallet.Transfer(wallet_pb2.TransferRequest(transfer=signed), metadata=c.md, timeout=10)
    print(f"sent {ait(amount)} to {args.to} (transaction {resp.transaction_id})", file=out)
    print(f"available {ait(resp.sender_balance.available)}", file=out)
    return 0


def admin_token(args: argparse.Namespace, what: str) -> str:
    token = args.admin_token or os.environ.get("AITBC_ADMIN_TOKEN", "") or os.environ.get("ADMIN_TOKEN", "")
    if not token:
        raise Failed(f"{what} needs an admin token: --admin-token or AITBC_ADMIN_TOKEN", EXIT_USAGE)
    return str(token)


async def cmd_faucet(c: Client, args: argparse.Namespace, out: TextIO) -> int:
    admin = admin_token(args, "the dev faucet")
    address = my_address(args)
    resp = await c.wallet.Mint(
        wallet_pb2.MintRequest(address=address, amount=int(args.amount * UAIT), request_id=secrets.token_hex(8)),
        metadata=auth_metadata(admin),
        timeout=10,
    )
    print(f"{address} now holds {ait(resp.balance.available)}", file=out)
    return 0


async def cmd_reset_miner_key(c: Client, args: argparse.Namespace, out: TextIO) -> int:
    """For an owner whose miner key file is lost: register the new key they
    sent (their sidecar prints it) in place of the old one."""
    admin = admin_token(args, "reset-miner-key")
    try:
        key = bytes.fromhex(args.public_key.strip())
    except ValueError:
        raise Failed("--public-key must be the new key in hex (64 characters)", EXIT_USAGE) from None
    if not args.reason.strip():
        raise Failed("--reason is required: it is written to the audit log", EXIT_USAGE)
    request_id = args.request_id or secrets.token_hex(8)
    resp = await c.admin.ResetMinerKey(
        cpb.ResetMinerKeyRequest(miner_id=args.miner_id, new_public_key=key, reason=args.reason,
                                 request_id=request_id),
        metadata=auth_metadata(admin),
        timeout=10,
    )  # fmt: skip
    print(f"miner     {args.miner_id}", file=out)
    print(f"old key   {resp.old_public_key.hex()}", file=out)
    print(f"new key   {resp.public_key.hex()}", file=out)
    print(f"request   {request_id} (a retry with --request-id {request_id} changes nothing twice)", file=out)
    print("streams under the old key are closed; the sidecar with the new key can connect now", file=out)
    return 0


def build_spec(args: argparse.Namespace) -> cpb.JobSpec:
    spec = cpb.JobSpec(max_price=args.max_price)
    w = args.workload
    if w == "matmul":
        spec.matmul.CopyFrom(workloads_pb2.MatmulParams(n=args.n, dtype=DTYPES[args.dtype], seed=args.seed,
                                                         repeats=args.repeats))  # fmt: skip
    elif w == "llm":
        spec.llm_gen.CopyFrom(workloads_pb2.LlmGenParams(model=args.model, prompt=args.prompt,
                                                         max_new_tokens=args.max_new_tokens))  # fmt: skip
        if args.sample_seed is not None:
            spec.llm_gen.sampling.CopyFrom(
                workloads_pb2.Sampling(seed=args.sample_seed, temperature=args.temperature, top_k=args.top_k)
            )
    elif w == "embed":
        spec.embed.CopyFrom(workloads_pb2.EmbedParams(model=args.model, texts=args.texts))
    else:
        spec.sd_infer.CopyFrom(workloads_pb2.SdInferParams(
            model=args.model, prompt=args.prompt, negative_prompt=args.negative_prompt, width=args.width,
            height=args.height, steps=args.steps, seed=args.seed, guidance_scale=args.guidance,
        ))  # fmt: skip
    if args.verify:
        kind, _, value = args.verify.partition(":")
        try:
            if kind == "freivalds":
                spec.verification.freivalds.SetInParent()
            elif kind == "redundant":
                spec.verification.redundant.k = int(value or 2)
            elif kind == "spot":
                spec.verification.spot_check.probability = float(value)
            else:
                raise ValueError(kind)
        except ValueError:
            raise Failed(f"--verify {args.verify!r}: use freivalds, redundant:K or spot:P", EXIT_USAGE) from None
    if args.deadline:
        ts = Timestamp()
        ts.FromSeconds(int(time.time() + args.deadline))
        spec.deadline_time.CopyFrom(ts)
    return spec


async def cmd_submit(c: Client, args: argparse.Namespace, out: TextIO) -> int:
    spec = build_spec(args)
    request_id = args.request_id or secrets.token_hex(8)
    # A coordinator whose wallet or database is away says UNAVAILABLE with
    # a RetryInfo: ask again, with the same request id, so a submit it had
    # half done is finished rather than made twice.
    give_up = time.monotonic() + SUBMIT_RETRY_SECS
    while True:
        try:
            resp = await c.coord.SubmitJob(
                cpb.SubmitJobRequest(spec=spec, request_id=request_id), metadata=c.md, timeout=30
            )
            break
        except grpc.aio.AioRpcError as err:
            delay = retry_after(err)
            if err.code() != grpc.StatusCode.UNAVAILABLE or delay is None or time.monotonic() + delay > give_up:
                raise
            print(f"{err.code().name} {error_reason(err)}: {err.details()}; retrying request {request_id} "
                  f"in {delay:g} s", file=sys.stderr, flush=True)  # fmt: skip
            await asyncio.sleep(delay)
    job = resp.job
    runs = f", {job.runs_needed} runs" if job.runs_needed > 1 else ""
    print(f"submitted {job.job_id}  price {ait(job.price)}{runs}", file=out, flush=True)
    if args.no_watch:
        return 0
    return await follow(c, job.job_id, out)


async def cmd_watch(c: Client, args: argparse.Namespace, out: TextIO) -> int:
    return await follow(c, args.job_id, out)


class Progress:
    """One line rewritten in place on a terminal; one line per change
    anywhere else (logs, pipes, CI)."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()
        self.last = ""

    def show(self, job: cpb.Job) -> None:
        state = state_name(job.state)
        bar = ""
        if job.state == cpb.JOB_STATE_RUNNING:
            filled = int(job.progress * 20)
            bar = f" [{'#' * filled}{'.' * (20 - filled)}] {job.progress:4.0%}"
            if job.progress_message:
                bar += f" {job.progress_message}"
        working = job.state in (cpb.JOB_STATE_ASSIGNED, cpb.JOB_STATE_RUNNING, cpb.JOB_STATE_VERIFYING)
        miner = f"  miner {job.miner_id}" if job.miner_id and (working or job.state in TERMINAL) else ""
        runs = ""
        if job.runs_needed > 1 and (working or job.state == cpb.JOB_STATE_QUEUED):
            runs = f"  run {min(len(job.runs) + 1, job.runs_needed)}/{job.runs_needed}"
        line = f"{job.job_id}  {state:<9}{miner}{runs}{bar}"
        if job.status_detail and job.state not in (cpb.JOB_STATE_RUNNING, cpb.JOB_STATE_SETTLED):
            line += f"  ({job.status_detail})"
        if line == self.last:
            return
        self.last = line
        if self.tty:
            self.out.write("\r\x1b[2K" + line[:200])
        else:
            self.out.write(line + "\n")
        self.out.flush()

    def end(self) -> None:
        if self.tty and self.last:
            self.out.write("\n")


async def follow(c: Client, job_id: str, out: TextIO) -> int:
    progress = Progress(out)
    final: cpb.Job | None = None
    async for ev in c.coord.WatchJob(cpb.WatchJobRequest(job_id=job_id), metadata=c.md):
        final = ev.job
        progress.show(final)
    progress.end()
    if final is None:
        raise Failed("the watch ended before any snapshot", EXIT_RPC)
    summary(final, out)
    return 0 if final.state == cpb.JOB_STATE_SETTLED else EXIT_UNSETTLED


def summary(job: cpb.Job, out: TextIO) -> None:
    print(f"state     {state_name(job.state)}", file=out)
    if job.verdict:
        print(f"verdict   {verdict_name(job.verdict)}", file=out)
    for r in job.runs:
        detail = f"  ({r.detail})" if r.detail and r.verdict != cpb.VERDICT_ACCEPTED else ""
        print(f"run       {r.miner_id}: {verdict_name(r.verdict)}{detail}", file=out)
    if job.state == cpb.JOB_STATE_SETTLED:
        print(f"price     {ait(job.price)} (miners {ait(job.miner_amount)}, fee {ait(job.fee_amount)})", file=out)
        u = job.usage
        rate = f", {u.items_per_second:,.1f} items/s" if u.items_per_second else ""
        print(f"usage     {u.device}, {u.run_duration.ToTimedelta().total_seconds():.3f} s{rate}", file=out)
        print(f"output    sha256 {job.output_sha256.hex()}", file=out)
    elif job.status_detail:
        print(f"detail    {job.status_detail}", file=out)


async def cmd_result(c: Client, args: argparse.Namespace, out: TextIO) -> int:
    job = (await c.coord.GetJob(cpb.GetJobRequest(job_id=args.job_id), metadata=c.md, timeout=10)).job
    digest = hashlib.sha256()
    target = Path(args.output)
    tmp = target.with_name(target.name + ".part")
    size = 0
    with tmp.open("wb") as f:
        async for chunk in c.coord.GetJobResult(cpb.GetJobResultRequest(job_id=args.job_id), metadata=c.md):
            f.write(chunk.data)
            digest.update(chunk.data)
            size += len(chunk.data)
    if digest.digest() != job.output_sha256:
        tmp.unlink()
        raise Failed("the result does not match the job's output digest: not written", EXIT_UNVERIFIED)
    tmp.replace(target)
    receipt_file = target.with_name(target.name + ".job")
    receipt_file.write_bytes(job.SerializeToString())
    print(f"wrote {size} bytes to {target} (sha256 checked)", file=out)
    print(f"wrote the job, receipt and settlement to {receipt_file} (check with `aitbc verify-receipt`)", file=out)
    return 0


async def cmd_cancel(c: Client, args: argparse.Namespace, out: TextIO) -> int:
    job = (await c.coord.CancelJob(cpb.CancelJobRequest(job_id=args.job_id), metadata=c.md, timeout=10)).job
    print(f"{job.job_id}  {state_name(job.state)}", file=out)
    return 0


async def cmd_jobs(c: Client, args: argparse.Namespace, out: TextIO) -> int:
    states = [cpb.JobState.Value(f"JOB_STATE_{s.upper()}") for s in args.state]
    resp = await c.coord.ListJobs(cpb.ListJobsRequest(states=states, page_size=args.limit), metadata=c.md, timeout=10)
    rows: list[tuple[str, ...]] = [("JOB", "WORKLOAD", "STATE", "PRICE (AIT)", "MINER", "CREATED")]
    for j in resp.jobs:
        rows.append((
            j.job_id, j.spec.WhichOneof("workload") or "-", state_name(j.state), f"{j.price / UAIT:.6f}",
            j.miner_id or "-", j.create_time.ToDatetime(UTC).strftime("%Y-%m-%d %H:%M:%S"),
        ))  # fmt: skip
    table(rows, out)
    return 0


def cmd_verify(args: argparse.Namespace, out: TextIO) -> int:
    """Offline: the job file from `aitbc result`, the coordinator's public
    key, optionally the output and the miner's key."""
    job = cpb.Job.FromString(Path(args.job_file).read_bytes())
    coordinator_key = bytes.fromhex(args.coordinator_key)
    problems: list[str] = []
    try:
        receipt = open_signed(
            job.receipt, crypto.RECEIPT_DOMAIN, bytes.fromhex(args.miner_key) if args.miner_key else None,
            signing_pb2.ReceiptBody,
        )  # fmt: skip
        print(f"receipt     signed by miner key {job.receipt.public_key.hex()[:16]}…: valid", file=out)
    except InvalidArgument as exc:
        raise Failed(f"receipt: {exc.message}", EXIT_UNVERIFIED) from None
    try:
        settlement = open_signed(job.settlement, crypto.SETTLEMENT_DOMAIN, coordinator_key, signing_pb2.SettlementBody)
        print("settlement  signed by the coordinator key: valid", file=out)
    except InvalidArgument as exc:
        raise Failed(f"settlement: {exc.message}", EXIT_UNVERIFIED) from None
    checks = [
        (settlement.receipt_sha256 == crypto.sha256(job.receipt.body), "the settlement pays for this receipt"),
        (settlement.job_id == receipt.job_id == job.job_id, f"both name job {job.job_id}"),
        (settlement.network_id == receipt.network_id, f"both name network {receipt.network_id}"),
        (receipt.output_sha256 == job.output_sha256, "the receipt's output digest is the job's"),
        (receipt.job_spec_sha256 == crypto.sha256(job.spec.SerializeToString(deterministic=True)),
         "the receipt is for this job's spec"),
    ]  # fmt: skip
    paid = settlement.miner_amount + sum(p.amount for p in settlement.co_payouts) + settlement.fee_amount
    checks.append((paid <= settlement.hold_amount, f"pays {ait(paid)} of a {ait(settlement.hold_amount)} hold"))
    if args.output:
        data = Path(args.output).read_bytes()
        checks.append((hashlib.sha256(data).digest() == receipt.output_sha256, f"{args.output} is the output"))
    for ok, what in checks:
        print(f"{'ok  ' if ok else 'FAIL'}        {what}", file=out)
        if not ok:
            problems.append(what)
    if problems:
        raise Failed(f"{len(problems)} check(s) failed", EXIT_UNVERIFIED)
    print(f"verified: {len(checks)} checks passed", file=out)
    return 0


def table(rows: Sequence[Sequence[str]], out: TextIO) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip(), file=out)


# -- parsing ----------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    env = os.environ.get
    ap = argparse.ArgumentParser(
        prog="aitbc", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--version", action="version", version=f"aitbc {__version__}")
    ap.add_argument("--coordinator", default=env("AITBC_COORDINATOR", "127.0.0.1:50051"))
    ap.add_argument("--wallet", default=env("AITBC_WALLET", "127.0.0.1:50052"))
    ap.add_argument("--token", default=env("AITBC_TOKEN", env("CLIENT_TOKEN", "")), help="bearer token (client)")
    ap.add_argument("--key-file", default=env("AITBC_KEY_FILE", "~/.aitbc/key"))
    ap.add_argument("--tls-ca", default=env("AITBC_TLS_CA", ""))
    ap.add_argument("--tls-cert", default=env("AITBC_TLS_CERT", ""))
    ap.add_argument("--tls-key", default=env("AITBC_TLS_KEY", ""))
    sub = ap.add_subparsers(dest="command", required=True)

    keys = sub.add_parser("keys", help="create or show your Ed25519 key and address")
    keys.add_argument("action", choices=["create", "show"])
    keys.add_argument("--force", action="store_true")
    keys.set_defaults(run=cmd_keys, offline=True)

    for name, fn, doc in (("balance", cmd_balance, "available and held"), ("history", cmd_history, "journal")):
        p = sub.add_parser(name, help=f"your account's {doc}")
        p.add_argument("--address", help="another account (admin tokens only)")
        p.add_argument("--limit", type=int, default=20)
        p.set_defaults(run=fn)
    transfer = sub.add_parser("transfer", help="send AIT, signed by your key")
    transfer.add_argument("to", help="the receiver's address")
    transfer.add_argument("amount", type=float, help="AIT")
    transfer.add_argument("--memo", default="")
    transfer.add_argument("--request-id", help="idempotency key: a retry with the same one moves nothing twice")
    transfer.add_argument("--network-id", default=env("AITBC_NETWORK_ID", "aitbc-devnet"))
    transfer.set_defaults(run=cmd_transfer)
    faucet = sub.add_parser("faucet", help="dev networks: mint AIT to your address with an admin token")
    faucet.add_argument("--amount", type=float, default=100.0, help="AIT")
    faucet.add_argument("--admin-token", default="")
    faucet.set_defaults(run=cmd_faucet)

    admin = sub.add_parser("admin", help="operator actions (admin token)")
    admin_sub = admin.add_subparsers(dest="action", required=True)
    reset = admin_sub.add_parser(
        "reset-miner-key", help="register a new receipt key for a miner whose key file is lost (audited)"
    )
    reset.add_argument("--miner-id", required=True)
    reset.add_argument("--public-key", required=True, help="the owner's new key, hex, as their sidecar prints it")
    reset.add_argument("--reason", required=True, help="for the audit log: ticket, how the owner was identified")
    reset.add_argument("--request-id", help="idempotency key (default: random); reuse it to retry")
    reset.add_argument("--admin-token", default="")
    reset.set_defaults(run=cmd_reset_miner_key)

    submit = sub.add_parser("submit", help="submit a job and follow it until it is settled")
    wl = submit.add_subparsers(dest="workload", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--max-price", type=int, default=10 * UAIT, help="uait (default 10 AIT)")
    common.add_argument("--verify", help="freivalds, redundant:K or spot:P (default: the workload's)")
    common.add_argument("--deadline", type=float, help="seconds from now")
    common.add_argument("--request-id", help="idempotency key (default: random)")
    common.add_argument("--no-watch", action="store_true")
    mm = wl.add_parser("matmul", parents=[common], help="C = A @ B, verified by Freivalds")
    mm.add_argument("--n", type=int, default=256)
    mm.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    mm.add_argument("--seed", type=int, default=0)
    mm.add_argument("--repeats", type=int, default=1)
    llm = wl.add_parser("llm", parents=[common], help="text generation (llm_gen)")
    llm.add_argument("--model", required=True)
    llm.add_argument("--prompt", required=True)
    llm.add_argument("--max-new-tokens", type=int, default=32)
    llm.add_argument("--sample-seed", type=int, help="seeded sampling (default: greedy)")
    llm.add_argument("--temperature", type=float, default=1.0)
    llm.add_argument("--top-k", type=int, default=0)
    emb = wl.add_parser("embed", parents=[common], help="sentence embeddings")
    emb.add_argument("texts", nargs="+")
    emb.add_argument("--model", default="")
    sd = wl.add_parser("sd", parents=[common], help="image generation (sd_infer), PNG out")
    sd.add_argument("--model", required=True)
    sd.add_argument("--prompt", required=True)
    sd.add_argument("--negative-prompt", default="")
    sd.add_argument("--width", type=int, default=512)
    sd.add_argument("--height", type=int, default=512)
    sd.add_argument("--steps", type=int, default=25)
    sd.add_argument("--seed", type=int, default=0)
    sd.add_argument("--guidance", type=float, default=0.0)
    submit.set_defaults(run=cmd_submit)

    for name, fn, doc in (("watch", cmd_watch, "follow a job until it ends"), ("cancel", cmd_cancel, "cancel a job")):
        p = sub.add_parser(name, help=doc)
        p.add_argument("job_id")
        p.set_defaults(run=fn)
    result = sub.add_parser("result", help="write a job's verified output to a file (and its receipt beside it)")
    result.add_argument("job_id")
    result.add_argument("-o", "--output", required=True)
    result.set_defaults(run=cmd_result)
    jobs = sub.add_parser("jobs", help="your jobs, newest first")
    jobs.add_argument("--state", action="append", default=[], help="e.g. settled (repeatable)")
    jobs.add_argument("--limit", type=int, default=20)
    jobs.set_defaults(run=cmd_jobs)
    verify = sub.add_parser("verify-receipt", help="check a receipt and its settlement offline")
    verify.add_argument("job_file", help="the .job file `aitbc result` wrote")
    verify.add_argument("--coordinator-key", default=env("COORDINATOR_PUBLIC_KEY", ""), required=False)
    verify.add_argument("--miner-key", help="hex; pin the miner's key too")
    verify.add_argument("--output", help="the output file, to check its digest")
    verify.set_defaults(run=cmd_verify, offline=True)
    return ap


def main(argv: list[str] | None = None, out: TextIO = sys.stdout) -> int:
    args = parser().parse_args(argv)
    if args.command == "verify-receipt" and not args.coordinator_key:
        print("error: --coordinator-key (or COORDINATOR_PUBLIC_KEY) is required", file=sys.stderr)
        return EXIT_USAGE
    run: Callable[..., Any] = args.run

    async def go() -> int:
        online: Callable[[Client, argparse.Namespace, TextIO], Awaitable[int]] = run
        client = Client(args)
        try:
            return await online(client, args, out)
        finally:
            await client.close()

    try:
        if getattr(args, "offline", False):
            return int(run(args, out))
        return asyncio.run(go())
    except Failed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    except grpc.aio.AioRpcError as err:
        reason = error_reason(err)
        print(f"error: {err.code().name}{' ' + reason if reason else ''}: {err.details()}", file=sys.stderr)
        return EXIT_RPC
    except KeyboardInterrupt:
        print("\ninterrupted: the job goes on; `aitbc watch JOB_ID` to follow it again", file=sys.stderr)
        return 130


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
