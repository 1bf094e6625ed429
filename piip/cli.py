"""Small helpers shared by the command-line entry points."""

from __future__ import annotations

import re
import sys

_RESOLUTION = re.compile(r"^(\+{0,2}resolution=)([\d_,]+)$")


def quote_resolution_overrides(argv: list[str] | None = None) -> list[str]:
    """Let `resolution=1568_896_448` (and sweeps `resolution=A,B`) name config files.

    Hydra's override grammar reads `1568_896_448` as the integer 1568896448 (underscores are digit
    separators), which cannot select a config group option; quoting each value keeps it a file name.
    """
    argv = sys.argv if argv is None else argv
    for i, arg in enumerate(argv):
        match = _RESOLUTION.match(arg)
        if match:
            values = ",".join(f"'{v}'" for v in match.group(2).split(",") if v)
            argv[i] = match.group(1) + values
    return argv
