"""`python -m piip.tools.sweep_summary`: CSV + metric-vs-GFLOPs PNG of a fake Hydra multirun directory."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from piip.analysis.sweeps import find_jobs, load_job, plot
from piip.tools.sweep_summary import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_job(root: Path, name: str, results: dict | str | None = None, overrides: list[str] | None = None):
    """A Hydra job dir: `.hydra/overrides.yaml` always, results.json (dict or raw text) when given."""
    job = root / name
    (job / ".hydra").mkdir(parents=True)
    overrides = overrides if overrides is not None else [f"job={name}"]
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if results is not None:
        text = results if isinstance(results, str) else json.dumps(results)
        (job / "results.json").write_text(text)
    return job


def result(model="piip_tiny", resolution=(64, 48, 32), gflops=0.05, score=0.5, monitor="val/top1", **extra):
    """A results.json body following train.py's contract."""
    metrics = extra.pop("metrics", {monitor: score, "val/loss": 1.0})
    return {
        "model": model,
        "task": "shapes",
        "resolution": list(resolution),
        "monitor": monitor,
        "score": score,
        "metrics": metrics,
        "params_m": 1.234,
        "gflops": gflops,
        "paper_params_m": 1.3,
        "paper_gflops": None,
        "overrides": [f"resolution='{'_'.join(map(str, resolution))}'", "trainer.max_epochs=2"],
        "ckpt_path": "/abs/best.ckpt",
        **extra,
    }


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """Three finished jobs whose GFLOPs order (2, 0, 1) differs from their launch order."""
    root = tmp_path / "multirun"
    write_job(root, "0", result(resolution=(64, 48, 32), gflops=0.05, score=0.61))
    write_job(root, "1", result(resolution=(96, 48, 32), gflops=0.09, score=0.70))
    write_job(root, "2", result(resolution=(32, 24, 16), gflops=0.02, score=0.40))
    return root


def test_csv_rows_columns_values_sorted_by_gflops(sweep, capsys):
    assert main([str(sweep)]) == 0
    header, rows = read_csv(sweep / "sweep_summary.csv")
    assert header == [
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
        "val/loss",
        "val/top1",
        "overrides",
    ]
    assert [r["job"] for r in rows] == ["2", "0", "1"]
    assert [float(r["gflops"]) for r in rows] == [0.02, 0.05, 0.09]
    first = rows[0]
    assert first["status"] == "ok"
    assert first["model"] == "piip_tiny"
    assert first["task"] == "shapes"
    assert first["resolution"] == "32_24_16"
    assert float(first["params_m"]) == 1.234
    assert float(first["paper_params_m"]) == 1.3
    assert first["paper_gflops"] == ""
    assert first["monitor"] == "val/top1"
    assert float(first["score"]) == 0.40
    assert float(first["val/top1"]) == 0.40
    assert float(first["val/loss"]) == 1.0
    assert first["overrides"] == "resolution='32_24_16' trainer.max_epochs=2"
    out = capsys.readouterr().out
    assert str(sweep / "sweep_summary.csv") in out
    assert str(sweep / "sweep_summary.png") in out
    assert "32_24_16" in out and "0.4" in out


def test_failed_job_gets_blank_row_last_with_hydra_overrides(sweep, capsys):
    write_job(sweep, "3", None, overrides=["resolution='128_64_32'"])
    assert main([str(sweep)]) == 0
    _, rows = read_csv(sweep / "sweep_summary.csv")
    assert [r["job"] for r in rows] == ["2", "0", "1", "3"]
    failed = rows[-1]
    assert failed["status"] == "failed"
    for column in ("model", "gflops", "score", "monitor", "resolution", "val/top1", "val/loss"):
        assert failed[column] == "", column
    assert failed["overrides"] == "resolution='128_64_32'"
    captured = capsys.readouterr()
    assert "3 ok, 1 failed; 3 plotted" in captured.out
    assert str(sweep / "3") in captured.err


def test_corrupt_json_is_a_failed_row_with_warning_naming_the_file(sweep, capsys):
    bad = write_job(sweep, "3", '{"model": "piip_tiny", "gflops": ')
    assert main([str(sweep)]) == 0
    _, rows = read_csv(sweep / "sweep_summary.csv")
    by_job = {r["job"]: r for r in rows}
    assert by_job["3"]["status"] == "failed"
    assert [by_job[j]["status"] for j in "012"] == ["ok", "ok", "ok"]
    err = capsys.readouterr().err
    assert "warning" in err and str(bad / "results.json") in err and "not valid JSON" in err


@pytest.mark.parametrize("field", ["model", "gflops", "monitor", "score", "metrics"])
def test_missing_required_field_names_file_and_field(tmp_path, field):
    body = result()
    del body[field]
    job = write_job(tmp_path, "0", body)
    row = load_job(job, tmp_path)
    assert row.status == "failed"
    assert str(job / "results.json") in row.error and repr(field) in row.error


def test_null_gflops_is_rejected_but_null_score_is_allowed(tmp_path):
    no_flops = load_job(write_job(tmp_path, "0", result(gflops=None)), tmp_path)
    assert no_flops.status == "failed" and "'gflops'" in no_flops.error
    no_score = load_job(write_job(tmp_path, "1", result(score=None)), tmp_path)
    assert no_score.status == "ok" and no_score.score is None


def test_metric_columns_are_the_union_blank_where_missing(tmp_path):
    write_job(tmp_path, "0", result(gflops=1.0, metrics={"val/top1": 0.5, "val/loss": 2.0}))
    write_job(tmp_path, "1", result(gflops=2.0, metrics={"val/top1": 0.6, "val/top5": 0.9}))
    assert main([str(tmp_path)]) == 0
    header, rows = read_csv(tmp_path / "sweep_summary.csv")
    assert header[header.index("score") + 1 : -1] == ["val/loss", "val/top1", "val/top5"]
    assert (rows[0]["val/loss"], rows[0]["val/top5"]) == ("2.0", "")
    assert (rows[1]["val/loss"], rows[1]["val/top5"]) == ("", "0.9")


def test_png_is_a_real_image(sweep):
    import matplotlib.image as mpimg

    assert main([str(sweep)]) == 0
    png = sweep / "sweep_summary.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert png.stat().st_size > 5_000
    image = mpimg.imread(png)
    assert image.ndim == 3 and image.shape[0] >= 300 and image.shape[1] >= 400 and image.shape[2] in (3, 4)
    assert image[..., :3].std() > 0.01  # not a blank canvas


def test_null_score_kept_in_csv_but_not_plotted(sweep, capsys):
    write_job(sweep, "3", result(resolution=(128, 64, 32), gflops=0.5, score=None))
    assert main([str(sweep)]) == 0
    _, rows = read_csv(sweep / "sweep_summary.csv")
    assert rows[-1]["job"] == "3" and rows[-1]["status"] == "ok" and rows[-1]["score"] == ""
    assert "4 ok, 0 failed; 3 plotted" in capsys.readouterr().out


def test_plot_annotations_add_model_only_when_several(tmp_path, sweep):
    rows = [load_job(p, sweep) for p in find_jobs(sweep)]
    assert plot(rows, None, tmp_path / "one.png") == ["32_24_16", "64_48_32", "96_48_32"]
    rows.append(load_job(write_job(sweep, "3", result(model="vit_t", resolution=(64,), gflops=0.3)), sweep))
    labels = plot(rows, None, tmp_path / "two.png")
    assert labels == ["piip_tiny 32_24_16", "piip_tiny 64_48_32", "piip_tiny 96_48_32", "vit_t 64"]
    assert (tmp_path / "two.png").stat().st_size > 5_000


def test_metric_option_selects_y_values(tmp_path, capsys):
    write_job(tmp_path, "0", result(gflops=1.0, metrics={"val/top1": 0.5, "val/top5": 0.875}))
    write_job(tmp_path, "1", result(gflops=2.0, metrics={"val/top1": 0.6}))
    assert main([str(tmp_path), "--metric", "val/top5"]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0].split()
    assert header[-1] == "val/top5"
    lines = {line.split()[0]: line.split() for line in out.splitlines()[1:3]}
    assert lines["0"][-1] == "0.875"
    assert lines["1"][-1] == "-"  # job 1 never logged val/top5: skipped in the plot
    assert "2 ok, 0 failed; 1 plotted" in out


def test_unknown_metric_error_lists_available_keys(sweep):
    with pytest.raises(SystemExit) as info:
        main([str(sweep), "--metric", "val/nope"])
    message = str(info.value.code)
    assert "'val/nope'" in message and "val/top1" in message and "val/loss" in message
    assert not (sweep / "sweep_summary.csv").exists()


def test_monitor_disagreement_needs_metric(tmp_path):
    write_job(tmp_path, "0", result(monitor="val/top1", metrics={"val/top1": 0.5, "val/loss": 1.0}))
    write_job(
        tmp_path, "1", result(monitor="val/loss", score=0.9, metrics={"val/top1": 0.6, "val/loss": 0.9})
    )
    with pytest.raises(SystemExit) as info:
        main([str(tmp_path)])
    message = str(info.value.code)
    assert "val/top1" in message and "val/loss" in message and "--metric" in message
    assert main([str(tmp_path), "--metric", "val/loss"]) == 0


def test_missing_dir_error_names_path(tmp_path):
    missing = tmp_path / "no_such_sweep"
    with pytest.raises(SystemExit) as info:
        main([str(missing)])
    assert str(missing) in str(info.value.code) and "does not exist" in str(info.value.code)
    file = tmp_path / "file.txt"
    file.write_text("x")
    with pytest.raises(SystemExit, match="not a directory"):
        main([str(file)])


def test_empty_dir_error_says_what_was_expected(tmp_path):
    (tmp_path / "logs").mkdir()
    with pytest.raises(SystemExit) as info:
        main([str(tmp_path)])
    message = str(info.value.code)
    assert str(tmp_path) in message and "multirun" in message and "results.json" in message


def test_find_jobs_nested_natural_order_without_descending_into_jobs(tmp_path):
    for name in ("a/10", "a/2", "b/c/0"):
        write_job(tmp_path, name, result())
    # Lightning/Hydra artefacts inside a job must not be mistaken for further jobs.
    write_job(tmp_path / "a" / "2", "lightning_logs/version_0", result())
    (tmp_path / "notes").mkdir()
    assert [p.relative_to(tmp_path).as_posix() for p in find_jobs(tmp_path)] == ["a/2", "a/10", "b/c/0"]


def test_out_prefix_and_trailing_suffix(sweep, tmp_path):
    assert main([str(sweep), "--out", str(tmp_path / "reports" / "tsb.csv")]) == 0
    assert (tmp_path / "reports" / "tsb.csv").is_file()
    assert (tmp_path / "reports" / "tsb.png").is_file()
    assert not (sweep / "sweep_summary.csv").exists()


@pytest.mark.slow  # 16 s; the resolution sweep test runs the entry point too
def test_module_entry_point(sweep, tmp_path):
    repo = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "piip.tools.sweep_summary"]
    ok = subprocess.run([*cmd, str(sweep)], cwd=repo, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert (sweep / "sweep_summary.csv").is_file() and (sweep / "sweep_summary.png").is_file()
    missing = subprocess.run(
        [*cmd, str(tmp_path / "nope")], cwd=repo, capture_output=True, text=True, timeout=60
    )
    assert missing.returncode != 0 and str(tmp_path / "nope") in missing.stderr
