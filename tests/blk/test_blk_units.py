"""Option value parsing: sizes and flags."""

from __future__ import annotations

import pytest

from vdev.units import parse_bool, parse_int, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (4096, 4096),
        ("4096", 4096),
        ("1k", 1024),
        ("4KiB", 4096),
        ("512M", 512 << 20),
        ("1G", 1 << 30),
        ("1gb", 1 << 30),
        (" 2 T ", 2 << 40),
        ("1.5G", 3 << 29),
        ("0.5k", 512),
    ],
)
def test_parse_size(text: int | str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "invalid size"),
        ("G", "invalid size"),
        ("12Q", "invalid size"),
        ("-1", "invalid size"),
        ("1.3", "not a whole number"),
        (0, "more than 0"),
        (-4096, "more than 0"),
        (True, "invalid size"),
    ],
)
def test_parse_size_errors(text: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_size(text)  # type: ignore[arg-type]


def test_parse_size_multiple() -> None:
    assert parse_size("1M", multiple_of=512) == 1 << 20
    with pytest.raises(ValueError, match="1000 is not a multiple of 512"):
        parse_size(1000, multiple_of=512)


@pytest.mark.parametrize(
    ("value", "expected"),
    [(True, True), (False, False), (1, True), (0, False), ("yes", True), ("On", True),
     ("true", True), ("1", True), ("no", False), ("off", False), ("FALSE", False), ("0", False)],
)  # fmt: skip
def test_parse_bool(value: object, expected: bool) -> None:
    assert parse_bool(value) is expected  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["maybe", 2, "2"])
def test_parse_bool_errors(value: object) -> None:
    with pytest.raises(ValueError, match="invalid flag"):
        parse_bool(value)  # type: ignore[arg-type]


@pytest.mark.parametrize(("value", "expected"), [(3, 3), ("3", 3), (" 0x10 ", 16), ("1", 1)])
def test_parse_int(value: int | str, expected: int) -> None:
    assert parse_int(value, 1, 16) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [("x", "invalid number"), ("1.5", "invalid number"), (True, "invalid number"),
     (0, "0 is not between 1 and 16"), ("17", "17 is not between 1 and 16")],
)  # fmt: skip
def test_parse_int_errors(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_int(value, 1, 16)  # type: ignore[arg-type]
