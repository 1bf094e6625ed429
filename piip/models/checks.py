"""Checks of single config values where they are read, so a bad value fails at start-up with its key.

They live in the lowest layer that reads config values (models) and import nothing but `piip.errors`, so
every layer above uses them too. Each returns the value as a plain `int`/`float`. Booleans are not numbers
here, and neither are numeric strings (`'1e-4'` quoted on the command line): the message shows what was read.
"""

from __future__ import annotations

import math
from typing import Any

from piip.errors import ConfigError


def is_number(value: Any) -> bool:
    """A real, finite number; `True`/`False` do not count (YAML turns `yes` into them)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def is_int(value: Any) -> bool:
    """An integer that is not a boolean (ids, counts)."""
    return isinstance(value, int) and not isinstance(value, bool)


def number_in(
    value: Any,
    key: str,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """`value` as a float, refused unless finite and within the bounds (closed unless `*_open`)."""
    if low is not None and high is not None:
        expected = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    elif low is not None:
        expected = f"a number {'>' if low_open else '>='} {low:g}"
    elif high is not None:
        expected = f"a number {'<' if high_open else '<='} {high:g}"
    else:
        expected = "a finite number"
    ok = is_number(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        raise ConfigError(f"{key}: expected {expected}, got {value!r}")
    return float(value)


def positive_number(value: Any, key: str) -> float:
    """A finite number > 0 (learning rates, epsilons)."""
    return number_in(value, key, 0, low_open=True)


def whole_number(value: Any, key: str, minimum: int = 1) -> int:
    """An integer >= `minimum` (batch sizes, epochs, devices); `2.0` is accepted, `2.5` is not."""
    if is_number(value) and float(value).is_integer() and value >= minimum:
        return int(value)
    raise ConfigError(f"{key}: expected a whole number >= {minimum}, got {value!r}")


def optional_whole_number(value: Any, key: str, minimum: int = 1) -> int | None:
    return None if value is None else whole_number(value, key, minimum)
