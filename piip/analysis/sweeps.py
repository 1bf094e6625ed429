"""Reading a Hydra multirun sweep: every job's `results.json` (failed and unfinished jobs as rows of their
own), a CSV, a metric-vs-GFLOPs scatter and a text table. `python -m piip.tools.sweep_summary` is its
command line."""

from __future__ import annotations

import csv
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from piip.data.files import atomic_file

RESULTS_FILE = "results.json"
HYDRA_DIR = ".hydra"
REQUIRED_FIELDS = ("model", "gflops", "monitor", "score", "metrics")
# CSV columns before the per-metric ones; `overrides` always comes last.
FIXED_COLUMNS = [
    "job",
    "status",
    "model",
    "task",
    "resolution",
    "params_m",
    "gflops",
    "paper_params_m",
    "paper_gflops",
    "monitor",
    "score",
]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">"]


@dataclass
class JobResult:
    """One sweep job: what its results.json says, or why it has no usable result (`status == "failed"`)."""

    job: str
    status: str = "ok"
    model: str | None = None
    task: str | None = None
    resolution: str | None = None
    params_m: float | None = None
    gflops: float | None = None
    paper_params_m: float | None = None
    paper_gflops: float | None = None
    monitor: str | None = None
    score: float | None = None
    metrics: dict[str, float | None] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)
    error: str | None = None  # why the job is failed; printed as a warning

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def value(self, metric: str | None) -> float | None:
        """The y value to plot: `score` for the default (monitor) metric, else the named metric."""
        if metric is None or (metric == self.monitor and metric not in self.metrics):
            return self.score
        return self.metrics.get(metric)


def _natural_key(text: str) -> list[Any]:
    """Sort `2` before `10` so Hydra's job numbers stay in launch order."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _is_job_dir(path: Path) -> bool:
    return (path / RESULTS_FILE).is_file() or (path / HYDRA_DIR).is_dir()


def find_jobs(root: Path) -> list[Path]:
    """Every job directory under `root` (nested sweep layouts included), in natural order.

    A job directory is one with a results.json or a `.hydra/` folder; we do not descend into it, so large
    checkpoint/logger trees inside jobs are never walked and cannot be mistaken for jobs.
    """
    root = Path(root)
    jobs: list[Path] = []
    for dirpath, dirnames, _ in os.walk(root):
        path = Path(dirpath)
        if _is_job_dir(path):
            jobs.append(path)
            dirnames[:] = []
            continue
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
    return sorted(jobs, key=lambda p: _natural_key(p.relative_to(root).as_posix()))


def _read_overrides_yaml(job_dir: Path) -> list[str]:
    """Hydra's own record of the job's overrides; used when results.json is missing or does not list them."""
    path = job_dir / HYDRA_DIR / "overrides.yaml"
    if not path.is_file():
        return []
    import yaml  # PyYAML comes with omegaconf/hydra-core

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return []
    return [str(item) for item in data] if isinstance(data, list) else []


def _format_resolution(value: Any) -> str | None:
    """`[64, 48, 32]` -> `64_48_32`, the same spelling as the `resolution=` override."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return "_".join(str(v) for v in value)
    return str(value).strip("'\"")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _optional_number(data: dict[str, Any], key: str, source: Path) -> float | None:
    value = data.get(key)
    if value is None:
        return None
    if not _is_number(value):
        raise ValueError(f"{source}: field {key!r} must be a number or null, got {value!r}")
    return float(value)


def load_job(path: Path, root: Path | None = None) -> JobResult:
    """Read one job directory into a `JobResult`; never raises for a bad job, so one broken run cannot hide
    the rest of the sweep: a missing, corrupt or incomplete results.json yields a failed result with `error`.
    """
    path = Path(path)
    job = path.relative_to(root).as_posix() if root is not None else path.name
    hydra_overrides = _read_overrides_yaml(path)
    results = path / RESULTS_FILE
    if not results.is_file():
        return JobResult(
            job=job,
            status="failed",
            overrides=hydra_overrides,
            error=f"{path}: no {RESULTS_FILE} (failed or unfinished job)",
        )
    try:
        return _parse_results(job, results, hydra_overrides)
    except (OSError, UnicodeDecodeError) as exc:
        error = f"{results}: cannot read: {exc}"
    except json.JSONDecodeError as exc:
        error = f"{results}: not valid JSON: {exc}"
    except ValueError as exc:
        error = str(exc)
    return JobResult(job=job, status="failed", overrides=hydra_overrides, error=error)


def _parse_results(job: str, results: Path, hydra_overrides: list[str]) -> JobResult:
    """Validate results.json against the train.py contract; raise ValueError naming the file and field."""
    data = json.loads(results.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{results}: expected a JSON object, got {type(data).__name__}")
    missing = [key for key in REQUIRED_FIELDS if key not in data]
    if missing:
        raise ValueError(f"{results}: missing required field(s) {', '.join(map(repr, missing))}")
    if not isinstance(data["model"], str):
        raise ValueError(f"{results}: field 'model' must be a string, got {data['model']!r}")
    if not isinstance(data["monitor"], str):
        raise ValueError(f"{results}: field 'monitor' must be a string, got {data['monitor']!r}")
    if not _is_number(data["gflops"]):
        raise ValueError(f"{results}: field 'gflops' must be a number, got {data['gflops']!r}")
    metrics = data["metrics"]
    if not isinstance(metrics, dict) or not all(v is None or _is_number(v) for v in metrics.values()):
        raise ValueError(f"{results}: field 'metrics' must map names to numbers, got {metrics!r}")
    overrides = data.get("overrides")
    if isinstance(overrides, str):
        overrides = overrides.split()
    elif not isinstance(overrides, list):
        overrides = hydra_overrides
    return JobResult(
        job=job,
        model=data["model"],
        task=data.get("task"),
        resolution=_format_resolution(data.get("resolution")),
        params_m=_optional_number(data, "params_m", results),
        gflops=float(data["gflops"]),
        paper_params_m=_optional_number(data, "paper_params_m", results),
        paper_gflops=_optional_number(data, "paper_gflops", results),
        monitor=data["monitor"],
        score=_optional_number(data, "score", results),
        metrics={str(k): (None if v is None else float(v)) for k, v in metrics.items()},
        overrides=[str(o) for o in overrides],
    )


def sort_rows(rows: Sequence[JobResult]) -> list[JobResult]:
    """Cheapest first, like the paper's x axis; failed jobs (no GFLOPs) go last in job order."""
    return sorted(
        rows,
        key=lambda r: (r.gflops is None, r.gflops if r.gflops is not None else 0.0, _natural_key(r.job)),
    )


def metric_keys(rows: Sequence[JobResult]) -> list[str]:
    """Union of every metric name any job logged, sorted, so all sweeps get the same column layout."""
    return sorted({key for row in rows for key in row.metrics})


def _cell(value: Any) -> str:
    return "" if value is None else str(value)


def write_csv(rows: Sequence[JobResult], path: Path) -> None:
    """One row per job, sorted by GFLOPs; blanks where a job has no value (failed, or metric not logged)."""
    rows = sort_rows(rows)
    keys = metric_keys(rows)
    with atomic_file(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*FIXED_COLUMNS, *keys, "overrides"])
        for row in rows:
            fixed = [getattr(row, column) for column in FIXED_COLUMNS]
            writer.writerow(
                [
                    *map(_cell, fixed),
                    *(_cell(row.metrics.get(k)) for k in keys),
                    " ".join(row.overrides),
                ]
            )


def resolve_metric(rows: Sequence[JobResult], metric: str | None) -> str | None:
    """Check the requested y-axis metric up front (before any file is written).

    Returns `metric` itself, or None meaning "each job's score", which is only meaningful when all finished
    jobs monitor the same metric.
    """
    finished = [r for r in rows if r.ok]
    if metric is not None:
        available = sorted(set(metric_keys(finished)) | {r.monitor for r in finished if r.monitor})
        if metric not in available:
            listed = ", ".join(available) if available else "(none: no finished job)"
            raise SystemExit(
                f"sweep_summary: error: metric {metric!r} is not in any job; available: {listed}"
            )
        return metric
    monitors = sorted({r.monitor for r in finished if r.monitor})
    if len(monitors) > 1:
        raise SystemExit(
            f"sweep_summary: error: jobs disagree on the monitored metric ({', '.join(monitors)}); "
            "choose the y axis with --metric NAME"
        )
    return None


def _label(rows: Sequence[JobResult], metric: str | None) -> str:
    if metric is not None:
        return metric
    monitors = {r.monitor for r in rows if r.ok and r.monitor}
    return monitors.pop() if len(monitors) == 1 else "score"


def plot(rows: Sequence[JobResult], metric: str | None, path: Path) -> list[str]:
    """Scatter `metric` (None: each job's monitored score) against actual GFLOPs and save it to `path`.

    One marker/colour per model; each point is annotated with its resolution (prefixed by the model when the
    sweep spans several). Jobs without a value are skipped. Returns the annotations, in plotting order.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(r, r.value(metric)) for r in sort_rows(rows) if r.ok and r.gflops is not None]
    points = [(r, v) for r, v in points if v is not None and math.isfinite(v)]
    models = sorted({r.model or "?" for r, _ in points})
    colours = plt.get_cmap("tab10")
    label = _label(rows, metric)

    fig, ax = plt.subplots(figsize=(7, 5), dpi=100)
    annotations: list[str] = []
    try:
        for index, model in enumerate(models):
            mine = [(r, v) for r, v in points if (r.model or "?") == model]
            ax.scatter(
                [r.gflops for r, _ in mine],
                [v for _, v in mine],
                marker=MARKERS[index % len(MARKERS)],
                color=colours(index % 10),
                label=model,
                zorder=3,
            )
            for row, value in mine:
                text = row.resolution or "?"
                if len(models) > 1:
                    text = f"{model} {text}"
                annotations.append(text)
                ax.annotate(text, (row.gflops, value), textcoords="offset points", xytext=(4, 4), fontsize=8)
        if points:
            ax.legend(title="model", fontsize=8)
        else:
            ax.text(
                0.5, 0.5, "no finished job with a value", ha="center", va="center", transform=ax.transAxes
            )
        ax.margins(x=0.12, y=0.08)  # room for the annotations at the edges
        ax.set_xlabel("GFLOPs (actual)")
        ax.set_ylabel(label)
        ax.set_title(f"{label} vs GFLOPs")
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        path = Path(path)
        with atomic_file(path) as stream:  # a temp file beside it, renamed over it when complete
            fig.savefig(stream, format=path.suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)
    return annotations


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def format_table(rows: Sequence[JobResult], metric: str | None) -> str:
    """A compact stdout view of the CSV: enough to eyeball the sweep without opening a file."""
    label = _label(rows, metric)
    header = ["job", "status", "model", "resolution", "gflops", label]
    body = [
        [r.job, r.status, r.model or "-", r.resolution or "-", _fmt(r.gflops), _fmt(r.value(metric))]
        for r in sort_rows(rows)
    ]
    widths = [max(len(str(line[i])) for line in [header, *body]) for i in range(len(header))]
    return "\n".join(
        "  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
        for line in [header, *body]
    )
