"""The command lines a user types: --help/--cfg, a 2-job resolution sweep and its summary."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import train as train_entry
from piip.errors import DataError
from tests.test_train import compose_config

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "trainer=cpu",
    "logger=csv",
    "callbacks.progress_bar=null",
    "trainer.max_epochs=1",
    "task.val_every_n_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.num_sanity_val_steps=0",
    "task.data.num_workers=0",
    "task.data.batch_size=8",
    "task.data.synthetic.train_per_class=6",
    "task.data.synthetic.val_per_class=2",
    "test_after_fit=false",
]


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "1"}
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def tiny_resolution_sweep(tmp_path: Path, *extra: str) -> tuple[Path, subprocess.CompletedProcess]:
    """`train.py -m` over two tiny resolutions, into `tmp_path/sweep`."""
    sweep = tmp_path / "sweep"
    overrides = [f"paths.root_dir={tmp_path}", f"hydra.sweep.dir={sweep}", *TINY, *extra]
    return sweep, run("train.py", "-m", "resolution=64_48_32,96_64_48", *overrides)


@pytest.mark.slow  # 28 s: two processes; the configs compose in process in tests/test_train.py
def test_help_and_cfg_show_the_composed_config():
    shown = run("train.py", "--help")
    assert shown.returncode == 0, shown.stderr
    assert "model: piip_sbl" in shown.stdout or "piip_sbl" in shown.stdout  # the groups a user can pick
    job = run("train.py", "model=piip_sbl", "task=imagenet", "resolution=384_192_128", "--cfg", "job")
    assert job.returncode == 0, job.stderr
    assert "name: piip_sbl" in job.stdout and "sizes:\n  - 384\n  - 192\n  - 128" in job.stdout


def test_resolution_sweep_runs_one_job_per_value_and_summarises(tmp_path):
    sweep, result = tiny_resolution_sweep(tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = {json.loads((sweep / str(i) / "results.json").read_text())["resolution"][0]: i for i in (0, 1)}
    assert sorted(jobs) == [64, 96]
    gflops = [json.loads((sweep / str(i) / "results.json").read_text())["gflops"] for i in (0, 1)]
    assert gflops[jobs[96]] > gflops[jobs[64]]  # more pixels, more compute

    summary = run("-m", "piip.tools.sweep_summary", str(sweep))
    assert summary.returncode == 0, summary.stderr
    rows = list(csv.DictReader((sweep / "sweep_summary.csv").open()))
    assert [r["resolution"] for r in rows] == ["64_48_32", "96_64_48"]  # sorted by GFLOPs
    assert (sweep / "sweep_summary.png").stat().st_size > 5000


def test_missing_dataset_names_the_path(tmp_path):
    """In process (a real process's one-line report of such errors: tests/test_predict_tool.py)."""
    overrides = [f"paths.root_dir={tmp_path}", *TINY, "task.data.synthetic=null"]
    expected = f"dataset split not found: {tmp_path / 'data' / 'shapes_imagenet'}/"
    with pytest.raises(DataError, match=re.escape(expected)):
        train_entry.train(compose_config("train", tmp_path / "run", overrides))


@pytest.mark.slow  # 32 s; multirun stays with the resolution sweep
def test_multirun_with_subprocess_ddp_runs_each_job_once_in_its_folder(tmp_path):
    """Lightning's DDP re-launches ranks > 0 from the command line; they must not re-run the sweep."""
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true"]
    sweep, result = tiny_resolution_sweep(tmp_path, *ddp)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    for job in ("0", "1"):
        assert (sweep / job / "results.json").is_file()
        assert (sweep / job / "train_ddp_process_1.log").is_file()  # rank 1 ran this job, in this folder
    assert not (tmp_path / "outputs").exists()  # no child fell back to a run folder of its own


@pytest.mark.slow  # 21 s
def test_a_resumed_run_continues_its_wandb_run(tmp_path):
    """A crashed (or requeued) process and the one resuming it log into one W&B run."""
    args = [
        f"paths.root_dir={tmp_path}",
        *TINY,
        "logger=wandb",
        "callbacks.last_checkpoint.every_n_train_steps=1",
    ]
    crash = ["+callbacks.crash._target_=tests.lightning_helpers.CrashAtStep", "+callbacks.crash.step=1"]
    crashed = run("train.py", *args, *crash)
    assert crashed.returncode != 0 and "simulated crash at step 1" in crashed.stderr
    resumed = run("train.py", *args, "ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    folders = list((tmp_path / "outputs" / "shapes" / "piip_tiny_64_48_32" / "wandb").glob("offline-run-*"))
    assert len(folders) == 2  # one per process
    assert len({folder.name.rsplit("-", 1)[1] for folder in folders}) == 1  # one run id
