#!/bin/sh
# Host packages the real-guest harness (vdev.testing.guest) needs on a fresh Debian 12.
#   qemu-system-x86  qemu-system-x86_64 (with seabios, ipxe-qemu)
#   qemu-utils       qemu-img, qemu-storage-daemon (reference back-end for benchmarks)
#   busybox-static   the guest's userland
#   fio              copied into the guest for benchmarks (build_guest(extra_binaries=["fio"]))
#   e2fsprogs, util-linux: mkfs.ext4, blkdiscard for guest scripts
#   apt + dpkg (always present) fetch and unpack the guest kernel (linux-image-amd64's
#   dependency) into ~/.cache/vdev/guest on first use; nothing is installed for it.
set -eu

packages="qemu-system-x86 qemu-utils busybox-static fio e2fsprogs util-linux"

if [ "$(id -u)" -eq 0 ]; then
    sudo=""
else
    sudo="sudo"
fi

export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -q
# shellcheck disable=SC2086  # word splitting of $packages is intended
$sudo apt-get install -y -q --no-install-recommends $packages

qemu-system-x86_64 --version | head -n 1
busybox | head -n 1
fio --version
