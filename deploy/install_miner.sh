#!/usr/bin/env bash
# Install the AITBC miner sidecar on a Debian host, as root, from a checkout:
#   sudo deploy/install_miner.sh
# Idempotent: re-running upgrades the code and keeps config, key and results
# (all of STATE_DIR=/var/lib/aitbc; back up /var/lib/aitbc/miner.key).
set -euo pipefail
[ "$(id -u)" -eq 0 ] || { echo "run as root" >&2; exit 1; }
SRC="$(cd "$(dirname "$0")/.." && pwd)"

apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv make >/dev/null
if command -v nvidia-smi >/dev/null && nvidia-smi >/dev/null 2>&1; then
    echo "NVIDIA GPU found: $(nvidia-smi --query-gpu=name --format=csv,noheader | paste -sd, -)"
    echo "note: requirements.txt pins a CPU-capable torch; for CUDA install a CUDA build of torch into /opt/aitbc/.venv"
else
    echo "no working nvidia-smi: the sidecar will run jobs on the CPU"
fi

id aitbc >/dev/null 2>&1 || useradd --system --home-dir /var/lib/aitbc --shell /usr/sbin/nologin aitbc
# The unit's StateDirectory= makes it too; here so doctor can run before the first start.
install -d -o aitbc -g aitbc -m 0700 /var/lib/aitbc

# Releases before STATE_DIR kept the key in WORK_DIR=/tmp/aitbc-work, which
# for a running unit is inside its PrivateTmp (deleted when it stops): save
# it now, before the next restart loses it.
if [ ! -f /var/lib/aitbc/miner.key ]; then
    for old in /tmp/systemd-private-*-aitbc-miner.service-*/tmp/aitbc-work/miner.key /tmp/aitbc-work/miner.key; do
        if [ -f "$old" ]; then
            install -o aitbc -g aitbc -m 0600 "$old" /var/lib/aitbc/miner.key
            echo "saved the miner key from $old to /var/lib/aitbc/miner.key: back it up"
            break
        fi
    done
fi
install -d -m 0755 /opt/aitbc /etc/aitbc

# The code, then its pinned dependencies and generated stubs.
tar -C "$SRC" --exclude=.venv --exclude=var --exclude=.git -cf - . | tar -C /opt/aitbc -xf -
make -C /opt/aitbc install protos >/dev/null

if [ ! -f /etc/aitbc/miner.conf ]; then
    install -o aitbc -g aitbc -m 0600 "$SRC/deploy/miner.conf.example" /etc/aitbc/miner.conf
    echo "wrote /etc/aitbc/miner.conf: set COORD_URL and API_KEY, then start the service"
fi
chown aitbc:aitbc /etc/aitbc/miner.conf && chmod 0600 /etc/aitbc/miner.conf

install -m 0644 "$SRC/deploy/aitbc-miner.service" /etc/systemd/system/aitbc-miner.service
install -m 0644 "$SRC/deploy/aitbc-miner.logrotate" /etc/logrotate.d/aitbc-miner
systemctl daemon-reload
systemctl enable aitbc-miner.service >/dev/null

echo "check the host:  sudo -u aitbc /opt/aitbc/.venv/bin/aitbc-miner doctor --config /etc/aitbc/miner.conf"
echo "then:            systemctl start aitbc-miner && journalctl -u aitbc-miner -f"
echo "and back up:     /var/lib/aitbc/miner.key (made on first start; it signs for this miner)"
