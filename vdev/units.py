"""Parsing option values given as text: sizes such as "512M", counts, on/off flags.

Options reach constructors as Python values (from a TOML file) or as strings (from
`-o KEY=VALUE` on the command line); these helpers accept both. They raise
`ValueError` with a message a caller can prefix with the option's name.
"""

from __future__ import annotations

import re
from fractions import Fraction

_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgtpe]?)(?:i?b)?\s*", re.IGNORECASE)
_UNITS = "kmgtpe"
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


def parse_size(value: int | str, *, multiple_of: int = 1) -> int:
    """Bytes in `value`: an integer, or text such as "4096", "512M", "1.5G", "2TiB".

    Suffixes are binary (K = 1024). The result must be positive and a multiple of
    `multiple_of`.
    """
    if isinstance(value, bool):
        raise ValueError(f"invalid size {value!r}")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.fullmatch(str(value))
        if match is None:
            raise ValueError(f"invalid size {value!r} (expected e.g. 4096, 512M, 1G)")
        number, unit = match.groups()
        scale = 1024 ** (_UNITS.index(unit.lower()) + 1) if unit else 1
        exact = Fraction(number) * scale
        if exact.denominator != 1:
            raise ValueError(f"invalid size {value!r} (not a whole number of bytes)")
        size = int(exact)
    if size <= 0:
        raise ValueError(f"invalid size {value!r} (must be more than 0)")
    if size % multiple_of:
        raise ValueError(f"size {size} is not a multiple of {multiple_of}")
    return size


def parse_bool(value: bool | int | str) -> bool:
    """A flag given as a bool, 0/1, or text: true/false, yes/no, on/off, 1/0."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"invalid flag {value!r} (expected true or false)")


def parse_int(value: int | str, low: int, high: int) -> int:
    """A whole number between `low` and `high` (inclusive), given as int or text."""
    if isinstance(value, bool):
        raise ValueError(f"invalid number {value!r}")
    try:
        number = value if isinstance(value, int) else int(str(value).strip(), 0)
    except ValueError:
        raise ValueError(f"invalid number {value!r}") from None
    if not low <= number <= high:
        raise ValueError(f"{number} is not between {low} and {high}")
    return number
