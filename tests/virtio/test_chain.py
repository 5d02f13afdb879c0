"""DescriptorChain helpers."""

from __future__ import annotations

from vdev.virtio.chain import DescriptorChain


def _chain() -> tuple[DescriptorChain, bytearray]:
    out = bytearray(10)
    view = memoryview(out)
    chain = DescriptorChain(
        head=3,
        readable=[memoryview(b"head"), memoryview(b"er")],
        writable=[view[0:3], view[3:4], view[4:10]],
    )
    return chain, out


def test_lengths_and_read_all() -> None:
    chain, _ = _chain()
    assert (chain.readable_len, chain.writable_len) == (6, 10)
    assert chain.read_all() == b"header"
    assert chain.ndescs == 1


def test_write_into_scatters_across_buffers() -> None:
    chain, out = _chain()
    assert chain.write_into(b"abcdef") == 6
    assert out == bytearray(b"abcdef\0\0\0\0")


def test_write_into_at_offset_and_short_space() -> None:
    chain, out = _chain()
    assert chain.write_into(b"XYZ", offset=2) == 3
    assert out[:6] == bytearray(b"\0\0XYZ\0")
    assert chain.write_into(memoryview(b"0123456789"), offset=7) == 3
    assert out[7:] == bytearray(b"012")
    assert chain.write_into(b"late", offset=10) == 0
