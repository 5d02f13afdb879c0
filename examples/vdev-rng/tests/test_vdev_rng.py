"""The example device tested as its author would, with vdev's pytest plugin: in this
process on both ring layouts, as a `vdev run rng` daemon, and read by a real guest."""

from __future__ import annotations

from vdev_rng import RngDevice

from vdev.testing import Frontend

RNG_QEMU_ARGS = ["-device", "vhost-user-rng-pci,chardev=rng0"]


async def test_fills_every_buffer_with_fresh_bytes(vdev_frontend, vdev_ring_layout) -> None:
    device = RngDevice()
    fe = await vdev_frontend(device, packed=vdev_ring_layout == "packed")
    queue = await fe.setup_queue(0)
    first = await queue.transact([], [64])
    second = await queue.transact([], [16, 48])
    assert first.written == second.written == 64
    assert len(b"".join(second.data)) == 64
    assert first.data[0] != b"".join(second.data)
    assert device.stats() == {"bytes_served": 128}


async def test_many_chains_in_one_kick(vdev_frontend) -> None:
    fe = await vdev_frontend(RngDevice())
    queue = await fe.setup_queue(0, size=16)
    for _ in range(16):
        queue.add([], [32])
    queue.kick()
    used = await queue.wait_used(16)
    assert [u.written for u in used] == [32] * 16
    assert len({u.data[0] for u in used}) == 16


async def test_served_by_vdev_run(vdev_daemon) -> None:
    daemon = await vdev_daemon("rng")
    async with Frontend.connect(daemon.socket) as fe:
        await fe.negotiate()
        queue = await fe.setup_queue(0)
        assert (await queue.transact([], [256])).written == 256


async def test_a_real_guest_reads_dev_hwrng(vdev_daemon, vdev_guest) -> None:
    daemon = await vdev_daemon("rng")
    result = await vdev_guest(
        "cat /sys/devices/virtual/misc/hw_random/rng_current\n"
        "dd if=/dev/hwrng bs=64 count=4 2>/dev/null | wc -c\n",
        qemu_args=["-chardev", f"socket,id=rng0,path={daemon.socket}", *RNG_QEMU_ARGS],
        extra_modules=["virtio-rng"],
    )
    assert result.exit_code == 0, result.console
    current, count = result.output.split()
    assert current.startswith("virtio_rng")
    assert count == "256"
