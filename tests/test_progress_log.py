"""The run's progress display (conf/callbacks/default.yaml -> piip.tasks.progress): plain log lines when
stdout is not a terminal, the rich bar when it is, and a model summary without Lightning's "Total FLOPs: 0".

A toy LightningModule (a linear layer on 64 random samples, batch 1: 64 steps per epoch) trains 2 epochs
under the configured callbacks and `trainer=cpu`, so the default of a line every 50 steps shows twice.
"""

from __future__ import annotations

import io
import logging
import re
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import RichProgressBar
from torch.utils.data import DataLoader, TensorDataset

from piip.errors import ConfigError
from piip.run import build
from tests.test_train import compose_config

STEP_LINE = re.compile(
    r"^epoch (\d)/2 \| step (\d+)/128 \| loss (\d+\.\d+) \| lr 1\.00e-01 \| ([\d.]+) images/s "
    r"\| ETA epoch (\d+:\d\d:\d\d), run (\d+:\d\d:\d\d)"
)


class Toy(L.LightningModule):
    """3 classes from 4 features; logs what the shapes task's checkpoint callback monitors (val/top1)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 3)
        generator = torch.Generator().manual_seed(0)
        self.data = TensorDataset(
            torch.randn(64, 4, generator=generator), torch.randint(3, (64,), generator=generator)
        )

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        loss = F.cross_entropy(self.layer(images), labels)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, labels = batch
        self.log("val/top1", (self.layer(images).argmax(-1) == labels).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=1)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=16)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def fit_with_configured_callbacks(tmp_path: Path, *overrides: str) -> L.Trainer:
    """The train config's callbacks and trainer (`trainer=cpu`, CSV logger) fitting `Toy` for 2 epochs."""
    cfg = compose_config(
        "train",
        tmp_path / "run",
        [
            f"paths.root_dir={tmp_path}",
            "trainer=cpu",
            "logger=csv",
            "trainer.max_epochs=2",
            "trainer.num_sanity_val_steps=1",
            "task.val_every_n_epochs=1",
            *overrides,
        ],
    )
    trainer = build.build_trainer(cfg, build.build_all(cfg, "callbacks"), build.build_loggers(cfg, False))
    trainer.fit(Toy())
    return trainer


@pytest.fixture(autouse=True)
def piip_logger_enabled(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever ran before in this process (a Hydra tool disables existing loggers), "piip" logs here."""
    monkeypatch.setattr(logging.getLogger("piip"), "disabled", False)


def progress_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "piip" and r.getMessage().startswith("epoch")]


def test_without_a_terminal_a_line_every_50_steps_and_at_each_validation(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(sys, "stdout", io.StringIO())  # a SLURM log, a pipe
    caplog.set_level(logging.INFO, logger="piip")
    trainer = fit_with_configured_callbacks(tmp_path)
    lines = progress_lines(caplog)
    steps = [STEP_LINE.match(line) for line in lines]
    assert lines and all(steps), lines
    assert not isinstance(trainer.progress_bar_callback, RichProgressBar)
    assert [(int(m[1]), int(m[2])) for m in steps] == [(1, 50), (1, 64), (2, 100), (2, 128)], lines
    assert all(float(m[3]) > 0 and float(m[4]) > 0 for m in steps), lines
    validation = [line for line in lines if "validation" in line]
    assert len(validation) == 2 and all("val/top1" in line for line in validation), lines  # no sanity check
    assert steps[-1][6] == "0:00:00" and steps[-1][5] == "0:00:00"  # nothing left at the end


def test_on_a_terminal_the_rich_bar_and_no_lines(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(sys, "stdout", Terminal())
    caplog.set_level(logging.INFO, logger="piip")
    trainer = fit_with_configured_callbacks(tmp_path)
    assert isinstance(trainer.progress_bar_callback, RichProgressBar)
    assert progress_lines(caplog) == []


def test_the_style_key_forces_either_display_and_refuses_others(monkeypatch):
    from piip.tasks.progress import ProgressLog, progress_bar

    monkeypatch.setattr(sys, "stdout", Terminal())
    assert isinstance(progress_bar("lines", every_n_steps=7), ProgressLog)
    assert progress_bar("lines", every_n_steps=7).every_n_steps == 7
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    assert isinstance(progress_bar("bar"), RichProgressBar)
    with pytest.raises(ConfigError, match="callbacks.progress_bar.style"):
        progress_bar("tqdm")
    with pytest.raises(ConfigError, match="every_n_steps"):
        progress_bar("lines", every_n_steps=0)


def test_the_model_summary_shows_no_zero_flops(tmp_path, capsys):
    fit_with_configured_callbacks(tmp_path, "trainer.limit_train_batches=2", "trainer.limit_val_batches=1")
    out = capsys.readouterr().out
    assert "Total params" in out and "layer" in out  # the summary itself is still there
    assert "FLOPs" not in out
