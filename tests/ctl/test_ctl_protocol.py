"""The control protocol without sockets: request parsing and line cutting."""

from __future__ import annotations

import json

import pytest

from vdev.ctl.protocol import (
    MAX_LINE,
    LineBuffer,
    LineTooLong,
    ListDevices,
    RequestError,
    Resize,
    SetLink,
    Stats,
    error,
    ok,
    parse_request,
)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b'{"cmd": "list"}', ListDevices()),
        (b'{"cmd": "stats"}', Stats()),
        (b'{"cmd": "stats", "device": "disk0"}', Stats("disk0")),
        (b'{"cmd": "resize", "device": "disk0", "size": "2G"}', Resize("disk0", 2 << 30)),
        (b'{"cmd": "resize", "device": "d", "size": 1048576}', Resize("d", 1 << 20)),
        (b'{"cmd": "link", "device": "nic", "up": false}', SetLink("nic", False)),
        (b' {"up": true, "device": "nic", "cmd": "link"} \r', SetLink("nic", True)),
    ],
)
def test_valid_requests(line: bytes, expected: object) -> None:
    assert parse_request(line) == expected


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b"", "not JSON"),
        (b"garbage", "not JSON"),
        (b'{"cmd": "list"', "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[" * 100_000, "not JSON"),
        (b"1" * 5000, "not JSON"),  # more digits than Python converts
        (b'["list"]', "a JSON object"),
        (b"{}", '"cmd"'),
        (b'{"cmd": 7}', '"cmd"'),
        (b'{"cmd": "reboot"}', "unknown command 'reboot'"),
        (b'{"cmd": "list", "device": "x"}', "unknown field(s) device"),
        (b'{"cmd": "stats", "device": 3}', '"device" must be a string'),
        (b'{"cmd": "stats", "device": null}', '"device" must be a string'),
        (b'{"cmd": "resize", "size": "1G"}', '"device" is required'),
        (b'{"cmd": "resize", "device": "d"}', '"size" is required'),
        (b'{"cmd": "resize", "device": "d", "size": true}', '"size" must be a number or a string'),
        (b'{"cmd": "resize", "device": "d", "size": 1.5}', '"size" must be a number or a string'),
        (b'{"cmd": "resize", "device": "d", "size": "lots"}', 'resize: "size": invalid size'),
        (b'{"cmd": "resize", "device": "d", "size": -4096}', "must be more than 0"),
        (b'{"cmd": "link", "device": "n", "up": 1}', '"up" must be true or false'),
        (b'{"cmd": "link", "device": "n", "up": "down"}', '"up" must be true or false'),
        (b'{"cmd": "link", "device": "n", "up": true, "x": 1, "a": 2}', "unknown field(s) a, x"),
    ],
)
def test_invalid_requests_say_why(line: bytes, message: str) -> None:
    with pytest.raises(RequestError) as info:
        parse_request(line)
    assert message in str(info.value)
    assert "\n" not in error(str(info.value)).rstrip(b"\n").decode()


def test_replies_are_one_json_line() -> None:
    assert json.loads(ok(devices=[])) == {"ok": True, "devices": []}
    line = error("two\nlines  and\tspaces")
    assert line.count(b"\n") == 1 and line.endswith(b"\n")
    assert json.loads(line) == {"ok": False, "error": "two lines and spaces"}


def test_line_buffer_cuts_lines_across_chunks() -> None:
    lines = LineBuffer()
    assert lines.next_line() is None and not lines.pending
    lines.feed(b'{"cmd": "li')
    assert lines.next_line() is None and lines.pending
    lines.feed(b'st"}\n{"cmd": "stats"}\n\n{"cm')
    assert [lines.next_line(), lines.next_line(), lines.next_line()] == [
        b'{"cmd": "list"}',
        b'{"cmd": "stats"}',
        b"",
    ]
    assert lines.next_line() is None and lines.pending


def test_line_buffer_limit() -> None:
    lines = LineBuffer(8)
    lines.feed(b"12345678\n")
    assert lines.next_line() == b"12345678"  # exactly the limit is fine
    lines.feed(b"123456789")
    with pytest.raises(LineTooLong, match="longer than 8 bytes"):
        lines.next_line()
    big = LineBuffer()
    big.feed(b"x" * (MAX_LINE + 1) + b"\n")
    with pytest.raises(LineTooLong):
        big.next_line()
