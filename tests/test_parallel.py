"""trainer=ddp and trainer=fsdp on CPU (gloo): two processes follow the loss trajectory of one process on the
same global batch, and FSDP's sharded checkpoints resume, evaluate and consolidate.

Each run goes through `python train.py` in a subprocess, as a user launches it: Lightning starts the second
rank by re-running that command. The global batch is 8 (1 x 8 or 2 x 4): the resumable sampler deals
rank r every second sample of the same shuffled order, and augmentation is seeded per sample, so both
set-ups see the same images per step. Drop path is off, so nothing random depends on the rank.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from piip.app import read_checkpoint
from piip.tools.consolidate import consolidate

ROOT = Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH = 6  # 8 classes x 6 images, global batch 8
SAVED, CRASH = 8, 9  # last.ckpt every 4 steps; a crash before step 9 resumes from step 8
# fp32 sums in another order (all-reduce vs one batch) differ in the last bits; AdamW then amplifies the
# difference for weights whose gradients are near zero. Measured: losses agree to ~1e-7 relative and
# weights to 2e-5 after 6 steps.
LOSS_RTOL = 1e-4
WEIGHT_ATOL = 1e-4

COMMON = [
    "logger=none",
    "callbacks.progress_bar=null",
    "callbacks.model_summary=null",
    "callbacks.best_checkpoint=null",
    "+trainer.enable_progress_bar=false",
    "+trainer.enable_model_summary=false",
    "+callbacks.losses._target_=tests.lightning_helpers.RecordLosses",
    "trainer.accelerator=cpu",
    "trainer.precision=32-true",
    "trainer.num_sanity_val_steps=0",
    "trainer.limit_val_batches=0",
    "trainer.deterministic=true",
    "task.data.num_workers=0",
    "task.data.synthetic.train_per_class=6",
    "task.data.synthetic.val_per_class=2",
    "task.backbone.interaction.drop_path=0",
    "test_after_fit=false",
    "trainer.max_epochs=2",
    "callbacks.last_checkpoint.every_n_train_steps=4",
]
ONE_PROCESS = ["trainer=cpu", "task.data.batch_size=8"]
DDP = ["trainer=ddp", "trainer.devices=2", "task.data.batch_size=4"]
FSDP = ["trainer=fsdp", "trainer.devices=2", "task.data.batch_size=4", "trainer.strategy.param_dtype=fp32"]


def train(root: Path, data: Path, *overrides: str, crashes: bool = False) -> Path:
    """Runs train.py (expecting it to fail when `crashes`); returns the run folder."""
    args = [f"paths.root_dir={root}", f"paths.data_dir={data}", *COMMON, *overrides]
    env = {**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "train.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert (done.returncode != 0) == crashes, done.stderr[-4000:]
    if crashes:
        assert "simulated crash" in done.stderr, done.stderr[-4000:]
    return root / "outputs" / "shapes" / "piip_tiny_64_48_32"


def mean_losses(run: Path, ranks: int, first_step: int = 0) -> list[float]:
    """The global batch's mean loss per step: the mean of the ranks' means (equal per-rank batches)."""
    per_rank = [
        json.loads((run / "losses" / f"rank{r}_from{first_step}.json").read_text()) for r in range(ranks)
    ]
    return [sum(values) / ranks for values in zip(*per_rank, strict=True)]


def assert_same_weights(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> None:
    assert expected.keys() == actual.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name].float(), tensor.float(), atol=WEIGHT_ATOL, rtol=0, msg=name)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One process, two epochs; also generates the shared data folder."""
    root = tmp_path_factory.mktemp("one_process")
    data = tmp_path_factory.mktemp("data")
    return data, train(root, data, *ONE_PROCESS)


def test_two_process_ddp_follows_the_one_process_loss_trajectory(tmp_path, reference):
    data, single = reference
    ddp = train(tmp_path, data, *DDP)
    expected = mean_losses(single, ranks=1)
    assert len(expected) == 2 * STEPS_PER_EPOCH
    assert mean_losses(ddp, ranks=2) == pytest.approx(expected, rel=LOSS_RTOL)
    assert expected[-1] < expected[0]  # it trained: a trajectory, not a constant
    one = read_checkpoint(single / "checkpoints" / "last.ckpt")
    two = read_checkpoint(ddp / "checkpoints" / "last.ckpt")
    assert two["global_step"] == one["global_step"] == 2 * STEPS_PER_EPOCH
    assert_same_weights(one["state_dict"], two["state_dict"])


def test_two_process_fsdp_follows_it_through_a_sharded_checkpoint_resume(tmp_path, reference):
    data, single = reference
    crash = [
        "+callbacks.crash._target_=tests.lightning_helpers.CrashAtStep",
        f"+callbacks.crash.step={CRASH}",
    ]
    first = train(tmp_path, data, *FSDP, *crash, crashes=True)
    folder = first / "checkpoints" / "last.ckpt"
    assert folder.is_dir() and len(list(folder.glob("*.distcp"))) == 2  # one shard per rank
    assert read_checkpoint(folder, weights=False)["global_step"] == SAVED  # mid-way through epoch 2
    resumed = train(tmp_path, data, *FSDP, "ckpt_path=last")
    assert resumed == first

    # weights, AdamW moments, schedule and sampler position all came back, or the rest would drift
    trajectory = mean_losses(first, 2)[:SAVED] + mean_losses(resumed, 2, first_step=SAVED)
    assert trajectory == pytest.approx(mean_losses(single, ranks=1), rel=LOSS_RTOL)

    one = read_checkpoint(single / "checkpoints" / "last.ckpt")
    sharded = read_checkpoint(folder)  # read without a process group: full tensors
    assert sharded["global_step"] == 2 * STEPS_PER_EPOCH
    assert_same_weights(one["state_dict"], sharded["state_dict"])
    shapes_only = read_checkpoint(folder, weights=False)
    assert {k: v.shape for k, v in shapes_only["state_dict"].items()} == {
        k: v.shape for k, v in one["state_dict"].items()
    }

    single_file = consolidate(folder)
    saved = torch.load(single_file, map_location="cpu", weights_only=True)
    assert saved["hyper_parameters"]["run_config"]["trainer"]["strategy"]["_target_"].endswith(
        "FSDP2Strategy"
    )
    assert "optimizer_states" not in saved and saved["global_step"] == 2 * STEPS_PER_EPOCH
    for name, tensor in sharded["state_dict"].items():
        assert torch.equal(saved["state_dict"][name], tensor), name
