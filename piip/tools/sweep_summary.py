"""Summarise a Hydra multirun sweep as a CSV and an accuracy-vs-GFLOPs scatter (the paper's trade-off figure).

Usage::

    python train.py -m resolution=1120_896_448,1568_896_448          # the sweep
    python -m piip.tools.sweep_summary multirun/2024-06-01/12-00-00   # -> .../sweep_summary.{csv,png}
    python -m piip.tools.sweep_summary DIR --out results/tsb --metric val/top5

Every job directory under DIR (searched recursively; Hydra names them ``0``, ``1``, ...) is expected to hold
the ``results.json`` that ``train.py`` writes at the end of a run. A job directory with ``.hydra/`` but no
``results.json`` is reported as a failed (or unfinished) job, and so is one whose ``results.json`` is corrupt
or lacks a required field; those get a warning on stderr and a ``status=failed`` row instead of stopping the
summary.

Outputs ``PREFIX.csv`` (one row per job, sorted by actual GFLOPs, failed jobs last) and ``PREFIX.png`` (the
chosen metric against actual GFLOPs, one point per finished job; default PREFIX is ``DIR/sweep_summary``).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from piip.analysis.sweeps import (
    HYDRA_DIR,
    RESULTS_FILE,
    find_jobs,
    format_table,
    load_job,
    plot,
    resolve_metric,
    write_csv,
)
from piip.run.cli import OneLineArgumentParser, run_tool


def _output_prefix(root: Path, out: str | None) -> Path:
    """`--out results/tsb` -> results/tsb.{csv,png}; a trailing .csv/.png is dropped rather than doubled."""
    if out is None:
        return root / "sweep_summary"
    prefix = Path(out)
    return prefix.with_suffix("") if prefix.suffix.lower() in {".csv", ".png"} else prefix


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; problems that leave nothing to summarise raise SystemExit with a message."""
    parser = OneLineArgumentParser(
        prog="python -m piip.tools.sweep_summary",
        description="Summarise a Hydra multirun sweep: a CSV of every job and a metric-vs-GFLOPs scatter.",
    )
    parser.add_argument("dir", type=Path, help="the Hydra multirun directory (its jobs write results.json)")
    parser.add_argument("--out", default=None, help="output prefix (default: DIR/sweep_summary)")
    parser.add_argument("--metric", default=None, help="y-axis metric (default: each job's monitor)")
    args = parser.parse_args(argv)

    root: Path = args.dir
    if not root.exists():
        raise SystemExit(f"sweep_summary: error: sweep directory {str(root)!r} does not exist")
    if not root.is_dir():
        raise SystemExit(f"sweep_summary: error: {str(root)!r} is not a directory")
    job_dirs = find_jobs(root)
    if not job_dirs:
        raise SystemExit(
            f"sweep_summary: error: no job directories under {str(root)!r}; expected a Hydra multirun "
            f"directory whose job sub-directories (0/, 1/, ...) hold {RESULTS_FILE} or {HYDRA_DIR}/"
        )

    rows = [load_job(path, root) for path in job_dirs]
    for row in rows:
        if row.error:
            print(f"sweep_summary: warning: {row.error}", file=sys.stderr)
    metric = resolve_metric(rows, args.metric)

    prefix = _output_prefix(root, args.out)
    csv_path, png_path = prefix.with_name(prefix.name + ".csv"), prefix.with_name(prefix.name + ".png")
    write_csv(rows, csv_path)
    plotted = plot(rows, metric, png_path)

    failed = sum(not r.ok for r in rows)
    print(format_table(rows, metric))
    print(f"{len(rows)} job(s): {len(rows) - failed} ok, {failed} failed; {len(plotted)} plotted")
    print(f"csv: {csv_path}")
    print(f"png: {png_path}")
    return 0


if __name__ == "__main__":
    run_tool("sweep_summary", main, sys.argv[1:])
