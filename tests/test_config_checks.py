"""Config values are checked where they are read, and each refusal names the key to change: optimiser values
(`task.optim.*`), batch sizes and a train split smaller than one batch (`task.data.*`), trainer settings
(`piip.run.checks`), resolutions and score thresholds."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from piip.data.base import ResumableDataModule
from piip.errors import ConfigError
from piip.tasks.optim import OptimConfig


# -- task.optim ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("lr", -1e-4, "task.optim.lr: expected a number > 0, got -0.0001"),
        ("lr", 0, "task.optim.lr: expected a number > 0, got 0"),
        ("lr", "fast", "task.optim.lr: expected a number > 0, got 'fast'"),
        ("lr", "1e-4", "task.optim.lr: expected a number > 0, got '1e-4'"),
        ("lr", math.nan, "task.optim.lr: expected a number > 0, got nan"),
        ("lr", True, "task.optim.lr: expected a number > 0, got True"),
        ("weight_decay", -0.05, "task.optim.weight_decay: expected a number >= 0, got -0.05"),
        ("warmup_steps", -5, "task.optim.warmup_steps: expected a whole number >= 0, got -5"),
        ("warmup_steps", 2.5, "task.optim.warmup_steps: expected a whole number >= 0, got 2.5"),
        ("warmup_epochs", -1, "task.optim.warmup_epochs: expected a number >= 0, got -1"),
        ("warmup_start_factor", 2, "task.optim.warmup_start_factor: expected a number in [0, 1], got 2"),
        ("betas", [0.9], "task.optim.betas: expected two numbers in [0, 1), got (0.9,)"),
        ("eps", 0, "task.optim.eps: expected a number > 0, got 0"),
        ("step_gamma", 0, "task.optim.step_gamma: expected a number > 0, got 0"),
        ("step_milestones", [8, -1], "task.optim.step_milestones: expected a number >= 0, got -1"),
        ("gradient_clip", -1.0, "task.optim.gradient_clip: expected a number > 0, got -1.0"),
        ("ema_decay", 1.5, "task.optim.ema_decay: expected a number in [0, 1), got 1.5"),
    ],
)
def test_bad_optimiser_values_name_the_key(field: str, value: Any, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        OptimConfig.from_dict({field: value})
    assert str(err.value) == expected


def test_good_optimiser_values_pass_as_plain_numbers() -> None:
    config = OptimConfig.from_dict({"lr": 1, "warmup_steps": 500.0, "warmup_start_factor": 0.0})
    assert (config.lr, config.warmup_steps) == (1.0, 500) and type(config.warmup_steps) is int


# -- task.data ---------------------------------------------------------------------------------------------
class ListData(ResumableDataModule):
    """A data module of `size` training samples."""

    def __init__(self, size: int, batch_size: Any, eval_batch_size: Any = None, num_workers: Any = 0) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, False, False, 0)
        self.size, self.root = size, Path("/data/tiny")

    def train_dataset(self) -> list[int]:
        return list(range(self.size))


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"batch_size": 0}, "task.data.batch_size: expected a whole number >= 1, got 0"),
        ({"batch_size": -2}, "task.data.batch_size: expected a whole number >= 1, got -2"),
        ({"batch_size": "8"}, "task.data.batch_size: expected a whole number >= 1, got '8'"),
        (
            {"batch_size": 2, "eval_batch_size": 0},
            "task.data.eval_batch_size: expected a whole number >= 1, got 0",
        ),
        ({"batch_size": 2, "num_workers": -1}, "task.data.num_workers: expected a whole number >= 0, got -1"),
    ],
)
def test_bad_batch_sizes_name_the_key(kwargs: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        ListData(10, **kwargs)
    assert str(err.value) == expected


def test_a_train_split_smaller_than_one_batch_is_refused_at_setup() -> None:
    ListData(4, batch_size=4).setup("fit")  # exactly one batch: fine
    ListData(3, batch_size=4).setup("validate")  # evaluation keeps partial batches
    with pytest.raises(ConfigError) as err:
        ListData(3, batch_size=4).setup("fit")
    assert str(err.value).startswith(
        "task.data.batch_size=4 is larger than the train split at /data/tiny (3 samples)"
    )
    assert "an epoch would take 0 steps; lower task.data.batch_size to at most 3" in str(err.value)
    data = ListData(5, batch_size=3)
    data.trainer = SimpleNamespace(world_size=2)
    with pytest.raises(ConfigError, match=r"\(5 samples, 2 per device over 2 devices\)"):
        data.setup("fit")


def test_the_coco_data_module_refuses_a_batch_larger_than_its_train_split(tmp_path: Path) -> None:
    from piip.data.coco import CocoDataModule
    from piip.data.synthetic.coco import write_coco_layout

    root = write_coco_layout(tmp_path / "coco", train_images=3, val_images=2, image_size=32, seed=0)
    data = CocoDataModule(str(root), input_size=32, scale=[32, 32], batch_size=4, num_workers=0)
    with pytest.raises(ConfigError, match=r"task.data.batch_size=4 is larger than .*coco \(3 samples\)"):
        data.setup("fit")


# -- trainer settings (piip.run.checks) -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["task.epochs=0"], "task.epochs: expected a whole number >= 1 (or -1: until task.max_steps), got 0"),
        (["trainer.devices=0"], "trainer.devices: expected auto, -1 (every device), a positive number"),
        (["trainer.devices=[]"], "trainer.devices: expected auto, -1 (every device), a positive number"),
        (["trainer.devices=[0,0]"], "trainer.devices: expected auto, -1 (every device), a positive number"),
        (["trainer.num_nodes=0"], "trainer.num_nodes: expected a whole number >= 1, got 0"),
        (["task.val_every_n_epochs=0"], "task.val_every_n_epochs: expected a whole number >= 1, got 0"),
        (["+task.max_steps=0"], "task.max_steps: expected a whole number >= 1 (or -1: no limit), got 0"),
        (
            ["task.epochs=-1"],
            "task.epochs=-1 trains until task.max_steps, which is -1: the run would never end",
        ),
        (
            ["trainer.accumulate_grad_batches=0"],
            "trainer.accumulate_grad_batches: expected a whole number >= 1",
        ),
    ],
)
def test_bad_trainer_settings_name_the_key(overrides: list[str], expected: str) -> None:
    from piip.run.checks import check_trainer_config
    from piip.run.config import compose

    check_trainer_config(compose("train", ["task=shapes_det"]))  # the shipped settings pass
    with pytest.raises(ConfigError) as err:
        check_trainer_config(compose("train", ["task=shapes_det", *overrides]))
    assert str(err.value).startswith(expected)


def test_devices_accept_every_form_lightning_does() -> None:
    from piip.run.checks import check_devices

    for devices in ("auto", -1, "-1", 1, 8, [0, 1], "0,1", "2"):
        check_devices(devices)
    for devices in (0, -2, 1.5, True, "0", "gpu"):
        with pytest.raises(ConfigError, match="trainer.devices"):
            check_devices(devices)


# -- resolutions and score thresholds ----------------------------------------------------------------------
@pytest.mark.parametrize("resolutions", [[0], [-64], [64.5], ["64"]])
def test_bad_resolutions_name_the_key(resolutions: list[Any]) -> None:
    from piip.models import PIIPBackbone
    from tests.conftest import make_piip_config, make_vit_spec

    with pytest.raises(ConfigError, match=r"model.resolutions\[0\] \(branch 0's image size in pixels\)"):
        PIIPBackbone(make_piip_config([make_vit_spec()], resolutions))


def test_score_thresholds_name_the_key() -> None:
    from piip.models.heads.mask_rcnn import MaskRCNNConfig
    from piip.tasks.detection import DetectionTask

    with pytest.raises(
        ConfigError, match=r"task.module.score_to_draw: expected a number in \[0, 1\], got 1.5"
    ):
        DetectionTask({"head": "pyramid"}, {}, num_classes=1, score_to_draw=1.5)
    with pytest.raises(
        ConfigError, match=r"task.module.detector.box_score_thresh: expected a number in \[0, 1\]"
    ):
        MaskRCNNConfig.from_dict({"box_score_thresh": -0.1})
