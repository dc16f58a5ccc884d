"""`python -m miner_svc rotate-key`: replace the receipt key, registering the
new one with the coordinator under the old one's signature."""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any

import grpc

from aitbc import crypto
from aitbc.auth import auth_metadata
from aitbc.config import EX_CONFIG
from aitbc.rpc import channel, error_reason
from aitbc.signed import seal
from aitbc.timeutil import ts_now
from aitbc.v1 import coordinator_pb2 as cpb
from aitbc.v1 import coordinator_pb2_grpc, signing_pb2
from miner_svc import _settings
from miner_svc._state import Layout


def rotate_key(conf: dict[str, Any]) -> int:
    from miner_svc._status import probe

    layout = Layout.from_config(conf)
    key_path = layout.key_file
    if not key_path.exists():
        print(f"no key at {key_path} yet: the sidecar makes one on its first start")
        return 1
    if asyncio.run(probe(conf["ADMIN_PORT"], conf["API_KEY"]))[0]:
        print("the sidecar is running and signs with the current key: stop it first (systemctl stop aitbc-miner)")
        return 1
    try:
        endpoint, tls = _settings.link(conf)
    except ValueError as exc:
        print(exc)
        return EX_CONFIG
    old = crypto.load_or_create_key(key_path)
    new = crypto.KeyPair.generate()
    body = signing_pb2.KeyRotationBody(
        network_id=conf["NETWORK_ID"], miner_id=conf["MINER_ID"], new_public_key=new.public_key,
        create_time=ts_now(), nonce=secrets.token_bytes(16),
    )  # fmt: skip
    signed = seal(body, crypto.KEY_ROTATION_DOMAIN, old)
    request = cpb.RotateKeyRequest(rotation=signed, new_key_signature=new.sign(crypto.KEY_ROTATION_DOMAIN, signed.body))
    pending = key_path.with_name(key_path.name + ".new")
    crypto.save_key(pending, new)  # on disk before the coordinator knows it

    async def call() -> cpb.RotateKeyResponse:
        async with channel(str(endpoint), tls) as ch:
            stub = coordinator_pb2_grpc.MinerGatewayServiceStub(ch)
            resp: cpb.RotateKeyResponse = await stub.RotateKey(
                request, metadata=auth_metadata(conf["API_KEY"]), timeout=10
            )
            return resp

    try:
        asyncio.run(call())
    except grpc.aio.AioRpcError as err:
        pending.unlink(missing_ok=True)
        print(f"the coordinator refused the new key: {err.code().name} {error_reason(err)}: {err.details()}")
        return 1
    key_path.rename(key_path.with_name(f"{key_path.name}.old-{int(time.time())}"))
    pending.rename(key_path)
    print(f"rotated: {key_path} now holds {new.public_key.hex()}; the old key is kept beside it")
    print(f"back up {key_path} again: the old one no longer signs for this miner")
    return 0
