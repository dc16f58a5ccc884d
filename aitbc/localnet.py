"""A network of real service processes on loopback (port 0), with an
identity for every role: what the integration tests and the benchmarks run
against."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from aitbc.addresses import address_of
from aitbc.auth import Principal, TokenTable, new_token
from aitbc.crypto import KeyPair, load_or_create_key
from aitbc.devnet import wait_ready

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Identity:
    token: str
    principal: Principal
    key: KeyPair | None = None

    @property
    def address(self) -> str:
        return self.principal.address


@dataclass
class Network:
    """Wallet and coordinator (and optionally miner sidecars) as real
    processes; identities for every role."""

    root: Path
    coordinator_key: KeyPair
    treasury: str
    ids: dict[str, Identity]
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    # --tls-ca/--tls-cert/--tls-key for every service and sidecar; empty: plaintext.
    tls_flags: list[str] = field(default_factory=list)

    @property
    def wallet_target(self) -> str:
        return f"127.0.0.1:{self.ports['wallet']}"

    def target(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    @property
    def coord_target(self) -> str:
        return f"127.0.0.1:{self.ports['coordinator']}"

    def log(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.log"

    def spawn(
        self, name: str, module: str, flags: list[str], env: dict[str, str], ready: Path, wait: bool = True
    ) -> int:
        self.log(name).parent.mkdir(parents=True, exist_ok=True)
        out = self.log(name).open("ab")
        # Metrics on a free port each (written to <ready>.metrics): many
        # services share this host.
        proc = subprocess.Popen(
            [sys.executable, "-m", module, *flags, *self.tls_flags, "--metrics-port", "0"],
            cwd=ROOT,
            # Keep what PYTHONPATH already holds: on a GPU host the carried
            # wheels live there (make gpu-check).
            env={
                **os.environ,
                "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                **env,
            },
            stdout=out,
            stderr=out,
        )
        out.close()
        self.procs[name] = proc
        if not wait:
            return 0
        port = wait_ready(ready, proc, name, log=self.log(name))
        self.ports[name] = port
        return port

    def start_wallet(self, *extra: str, db: str | None = None, name: str = "wallet", port: int = 0) -> int:
        ready = self.root / "run" / f"{name}.port"
        ready.unlink(missing_ok=True)
        return self.spawn(
            name,
            "wallet_svc",
            [
                "--port",
                str(port),
                "--db",
                db or str(self.root / "wallet.sqlite"),
                "--tokens-file",
                str(self.root / "principals.json"),
                "--coordinator-public-key",
                self.coordinator_key.public_key.hex(),
                "--treasury-address",
                self.treasury,
                "--ready-file",
                str(ready),
                *extra,
            ],
            {},
            ready,
        )

    def start_coordinator(
        self,
        *extra: str,
        port: int = 0,
        name: str = "coordinator",
        coord_db: str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        ready = self.root / "run" / f"{name}.port"
        ready.unlink(missing_ok=True)
        self.spawn(
            name,
            "coordinator_svc",
            [
                "--port",
                str(port),
                "--db",
                coord_db or str(self.root / "coordinator.sqlite"),
                "--blobs-dir",
                str(self.root / "blobs"),
                "--tokens-file",
                str(self.root / "principals.json"),
                "--key-file",
                str(self.root / "coordinator.key"),
                "--wallet-target",
                self.wallet_target,
                "--ready-file",
                str(ready),
                *extra,
            ],
            {"AITBC_COORD_WALLET_TOKEN": self.ids["coordinator"].token, **(env or {})},
            ready,
        )

    def start_miner(
        self,
        name: str = "miner",
        wait: bool = True,
        coordinator: str = "coordinator",
        extra: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        ident = self.ids[name]
        ready = self.root / "run" / f"{name}.ready"
        ready.unlink(missing_ok=True)
        self.spawn(
            name,
            "miner_svc",
            [
                "--coord-url",
                self.target(coordinator),
                "--miner-id",
                ident.principal.miner_id,
                "--state-dir",
                str(self.root / name),
                # A test network is thrown away with its folder (under /tmp).
                "--allow-tmp-state",
                "true",
                "--wallet-addr",
                ident.address,
                "--accel-mode",
                "cpu",
                "--admin-port",
                "0",
                "--ready-file",
                str(ready),
                *extra,
            ],
            {"AITBC_MINER_API_KEY": ident.token, **(env or {})},
            ready,
            wait,
        )

    def add_identity(self, name: str, role: str, *, miner_id: str = "") -> Identity:
        """A new identity with a key, its token live at once: the services
        reload the principals file within a second."""
        key = KeyPair.generate()
        ident = Identity(new_token(), Principal(name, role, address=address_of(key.public_key), miner_id=miner_id), key)
        self.ids[name] = ident
        TokenTable.dump(self.root / "principals.json", [(i.token, i.principal) for i in self.ids.values()])
        return ident

    def stop(self, name: str, sig: int = signal.SIGTERM) -> int:
        proc = self.procs.pop(name)
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def stop_all(self) -> None:
        for name in reversed(list(self.procs)):
            self.stop(name)


def make_network(root: Path) -> Network:
    root.mkdir(parents=True, exist_ok=True)
    coordinator_key = load_or_create_key(root / "coordinator.key")
    treasury = address_of(KeyPair.generate().public_key)
    ids: dict[str, Identity] = {}

    def add(name: str, role: str, *, with_key: bool = False, miner_id: str = "", expires: float = 0.0) -> None:
        key = KeyPair.generate() if with_key else None
        address = address_of(key.public_key) if key else ""
        principal = Principal(name, role, address=address, miner_id=miner_id, expires=expires)
        ids[name] = Identity(new_token(), principal, key)

    add("admin", "admin")
    add("coordinator", "coordinator")
    add("client", "client", with_key=True)
    add("client2", "client", with_key=True)
    add("miner", "miner", with_key=True, miner_id="miner-1")
    add("miner2", "miner", with_key=True, miner_id="miner-2")
    add("miner3", "miner", with_key=True, miner_id="miner-3")
    add("cheater", "miner", with_key=True, miner_id="cheater-1")
    add("cheater2", "miner", with_key=True, miner_id="cheater-2")
    add("expired", "admin", expires=1.0)  # expired in 1970: refused everywhere
    TokenTable.dump(root / "principals.json", [(i.token, i.principal) for i in ids.values()])
    return Network(root=root, coordinator_key=coordinator_key, treasury=treasury, ids=ids)
