"""Sizes and units: reading '24GiB' from a flag, and writing bytes, counts, rates and times for a table.

Results keep bytes as int and seconds as float; only the report layer calls the formatters here.
"""

from __future__ import annotations

import re
from enum import StrEnum

from optprof.errors import UsageError


class Unit(StrEnum):
    """Byte units of a table: decimal GB / MB or binary GiB / MiB."""

    GB = "gb"
    GIB = "gib"
    MB = "mb"
    MIB = "mib"


# Suffixes a size flag accepts (case-insensitive) -> bytes. Decimal (kB, MB, GB) and binary (KiB, MiB, GiB).
BYTE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
              "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
# Table units -> (bytes per unit, label).
UNITS: dict[str, tuple[float, str]] = {"gb": (1e9, "GB"), "gib": (2**30, "GiB"), "mb": (1e6, "MB"),
                                       "mib": (2**20, "MiB")}
UNIT_NOTES = {"gb": "GB = 10^9 bytes", "gib": "GiB = 2^30 bytes", "mb": "MB = 10^6 bytes", "mib": "MiB = 2^20 bytes"}


def parse_bytes(text: str, flag: str, allow_zero: bool = False) -> int:
    """'24GiB', '500MB', '1.5gb' or a plain byte count -> bytes; a UsageError naming `flag` otherwise."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in BYTE_UNITS or (float(match.group(1)) == 0 and not allow_zero):
        raise UsageError(f"{flag}: cannot read '{text}' as a size: use e.g. 24GiB, 80GB or 500MB")
    return int(float(match.group(1)) * BYTE_UNITS[unit])


def auto_units(largest_bytes: int) -> str:
    """GB when the largest figure reaches a gigabyte, MB below (the demo model's figures are tens of MB)."""
    return "gb" if largest_bytes >= 1e9 else "mb"


def format_bytes(n: int | float | None, units: str = "gb") -> str:
    if n is None:
        return "-"
    scale, _ = UNITS[units]
    value = n / scale
    return f"{value:,.2f}" if value >= 0.01 or n == 0 else "<0.01"


def format_count(n: int | None) -> str:
    if n is None:
        return "-"
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:,.2f}{suffix}"
    return str(n)


def format_fraction(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def format_rate(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}"


def format_ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1000 * seconds:,.1f}"


def format_measure(is_bytes: bool, value: float | None) -> str:
    """A guarded figure as `optprof check` shows it: whole bytes, or one decimal (tokens/s)."""
    if value is None:
        return "-"
    return f"{value:,.0f}" if is_bytes else f"{value:,.1f}"
