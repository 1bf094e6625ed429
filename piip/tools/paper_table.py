"""The paper's released parameter and FLOP figures (PAPER.md §4.4), as (model, task, resolution) rows.

`python -m piip.tools.paper_table` counts every row with the paper protocol and prints ours beside the
paper's; `tests/test_paper_table.py` checks each row within 2 % (of PAPER.md's recount where it gives one).
"""

from __future__ import annotations

import sys

from piip.analysis.paper_rows import ROWS, PaperRow
from piip.errors import ConfigError
from piip.run.cli import run_tool
from piip.run.config import compose
from piip.run.results import paper_complexity

__all__ = ["ROWS", "PaperRow", "count_row", "main", "relative_error"]


def count_row(row: PaperRow) -> tuple[float, float]:
    """(params M, GFLOPs) of a row with the paper protocol."""
    result = paper_complexity(compose("flops", row.overrides))
    return result.params_m, result.gflops


def relative_error(ours: float, paper: float) -> float:
    return abs(ours - paper) / paper


def main(argv: list[str] | None = None) -> int:
    if argv:
        raise ConfigError(
            f"takes no arguments (got {' '.join(argv)}); usage: python -m piip.tools.paper_table"
        )
    print(
        "| table | model | task | resolution | #Param ours / paper (M) | #FLOPs ours / paper (G) | Δ FLOPs |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in ROWS:
        params, gflops = count_row(row)
        paper_params = f"{row.params_m:g}" if row.params_m is not None else "–"
        paper_gflops = f"{row.gflops:g}" if row.gflops is not None else "–"
        if row.expected_gflops is None:
            delta = f"– ({row.note})"
        else:
            delta = f"{100 * (gflops - row.expected_gflops) / row.expected_gflops:+.2f} %"
        note = f" vs recount {row.protocol_gflops:g} ({row.note})" if row.protocol_gflops else ""
        if row.protocol_params_m:
            paper_params += f" (recount {row.protocol_params_m:g})"
        print(
            f"| {row.table} | {row.model} | {row.task} | {row.resolution.replace('_', '/')} | "
            f"{params:.1f} / {paper_params} | {gflops:.1f} / {paper_gflops} | {delta}{note} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    run_tool("paper_table", main, sys.argv[1:])
