"""A run killed at any moment and resumed with `ckpt_path=last` ends exactly like an uninterrupted run: the
same epoch boundaries, step count, validation metrics and weights, for a grid of kill points."""

from __future__ import annotations

import json

import pytest
import torch

import train as train_entry
from tests.kill_points import Killed, RecordEpochEnds
from tests.test_train import checkpoint_dir, train_config

COMMON = [
    "trainer.max_epochs=3",  # 6 steps an epoch: epochs end at steps 6, 12, 18
    "trainer.deterministic=true",
    "callbacks.last_checkpoint.every_n_train_steps=4",  # saves at 4, 8, 12, 16 and at every epoch end
    "test_after_fit=false",
    "+callbacks.epoch_ends._target_=tests.kill_points.RecordEpochEnds",
]
KILLS = {  # name -> the callback that stops the first attempt
    "before_any_save": [
        "+callbacks.kill._target_=tests.kill_points.KillBeforeStep",
        "+callbacks.kill.step=3",
    ],
    "mid_epoch": ["+callbacks.kill._target_=tests.kill_points.KillBeforeStep", "+callbacks.kill.step=9"],
    "right_after_a_save": [
        "+callbacks.kill._target_=tests.kill_points.KillBeforeStep",
        "+callbacks.kill.step=8",
    ],
    "at_an_epoch_start": [
        "+callbacks.kill._target_=tests.kill_points.KillBeforeStep",
        "+callbacks.kill.step=12",
    ],
    "during_validation": [
        "+callbacks.kill._target_=tests.kill_points.KillInValidation",
        "+callbacks.kill.epoch=1",
    ],
    "during_a_save": ["+callbacks.kill._target_=tests.kill_points.KillDuringSave", "+callbacks.kill.step=16"],
}
FAST = ("mid_epoch", "during_a_save")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory):
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory, data_dir):
    run = tmp_path_factory.mktemp("straight")
    train_entry.train(train_config(run, data_dir, *COMMON))
    return run


@pytest.mark.parametrize(
    "kill", [pytest.param(k, marks=() if k in FAST else pytest.mark.slow) for k in KILLS]
)
def test_killed_and_resumed_run_equals_an_uninterrupted_one(kill, straight, data_dir, tmp_path) -> None:
    with pytest.raises(Killed):
        train_entry.train(train_config(tmp_path, data_dir, *COMMON, *KILLS[kill]))
    train_entry.train(train_config(tmp_path, data_dir, *COMMON, "ckpt_path=last"))

    assert (
        RecordEpochEnds.read(tmp_path / "run")
        == RecordEpochEnds.read(straight / "run")
        == {0: 6, 1: 12, 2: 18}
    )
    a = json.loads((straight / "run" / "results.json").read_text())["metrics"]
    b = json.loads((tmp_path / "run" / "results.json").read_text())["metrics"]
    evaluation = {k: v for k, v in a.items() if k.startswith("val")}
    assert evaluation and {k: b[k] for k in evaluation} == evaluation
    last_a = torch.load(checkpoint_dir(straight) / "last.ckpt", weights_only=True)
    last_b = torch.load(sorted(checkpoint_dir(tmp_path).glob("last*.ckpt"))[-1], weights_only=True)
    assert last_a["global_step"] == last_b["global_step"] == 18
    assert last_a["loops"]["fit_loop"]["epoch_progress"] == last_b["loops"]["fit_loop"]["epoch_progress"]
    different = [n for n, t in last_a["state_dict"].items() if not torch.equal(t, last_b["state_dict"][n])]
    assert different == []


@pytest.mark.slow
def test_killed_twice_in_one_epoch_keeps_counting_the_batches_consumed(straight, data_dir, tmp_path) -> None:
    """The second save after a mid-epoch resume must count the batches consumed before the resume too."""
    often = [*COMMON, "callbacks.last_checkpoint.every_n_train_steps=2"]  # saves at 2, 4, 8, 10, ...
    kill = "+callbacks.kill._target_=tests.kill_points.KillBeforeStep"
    with pytest.raises(Killed):
        train_entry.train(train_config(tmp_path, data_dir, *often, kill, "+callbacks.kill.step=3"))
    with pytest.raises(Killed):  # resumed from step 2, saved at 4, killed again before 5
        train_entry.train(
            train_config(tmp_path, data_dir, *often, kill, "+callbacks.kill.step=5", "ckpt_path=last")
        )
    saved = torch.load(checkpoint_dir(tmp_path) / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 4
    assert saved["ImageFolderDataModule"]["batches_done"] == 4
    train_entry.train(train_config(tmp_path, data_dir, *often, "ckpt_path=last"))
    assert RecordEpochEnds.read(tmp_path / "run") == {0: 6, 1: 12, 2: 18}
    last_a = torch.load(checkpoint_dir(straight) / "last.ckpt", weights_only=True)
    last_b = torch.load(sorted(checkpoint_dir(tmp_path).glob("last*.ckpt"))[-1], weights_only=True)
    different = [n for n, t in last_a["state_dict"].items() if not torch.equal(t, last_b["state_dict"][n])]
    assert different == []
