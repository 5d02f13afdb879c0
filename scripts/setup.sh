#!/usr/bin/env bash
# Installs everything vdev, its tests and its demo need on a Debian 12 machine:
# QEMU and the guest's build tools from apt, Python packages into ./.venv.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

# qemu-utils brings qemu-storage-daemon (the C reference in benchmarks); busybox-static,
# fio, e2fsprogs and util-linux are copied into the test guest's initramfs.
# libatomic1 gives the dirty log of a live migration its atomic OR (vdev/virtio/dirtylog.py).
# libvirt-clients (virt-xml-validate, which runs xmllint from libxml2-utils) checks the
# libvirt snippets in qemu-configs/.
APT_PACKAGES=(qemu-system-x86 qemu-utils libatomic1 busybox-static fio e2fsprogs util-linux iproute2 kmod dpdk-dev librte-net-virtio23 librte-net-vhost23 libvirt-clients libxml2-utils)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
    missing+=(python3-venv)
fi
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# The example plugin (examples/vdev-rng) is installed too: its own test suite runs
# against it as a plugin author's would.
if ! .venv/bin/python -c 'import vdev, vdev_rng, pytest_trio, hypothesis' 2>/dev/null \
    || [ pyproject.toml -nt .venv/.installed ] \
    || [ examples/vdev-rng/pyproject.toml -nt .venv/.installed ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e ".[test,bench]"
    .venv/bin/python -m pip install -q --no-deps -e examples/vdev-rng
    touch .venv/.installed
fi
