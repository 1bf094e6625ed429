"""What a run prints while it trains: a rich progress bar on a terminal, plain log lines where nobody sees a
bar (a file, a pipe, a SLURM `slurm-*.out`: the bar prints nothing there until the run ends), and Lightning's
model summary without the FLOPs column it cannot fill.

`conf/callbacks/default.yaml` builds the display with `progress_bar(style, every_n_steps)`: exactly one of the
two is active, chosen once at start-up.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ProgressBar, RichModelSummary, RichProgressBar
from lightning.pytorch.utilities.model_summary.model_summary import (
    get_formatted_model_size,
    get_human_readable_count,
)

from piip.errors import ConfigError
from piip.tasks.callbacks import batch_images

log = logging.getLogger("piip")  # Hydra's job logging sends it to stdout and <run>/train.log
STYLES = ("auto", "bar", "lines")


def progress_bar(style: str = "auto", every_n_steps: int = 50) -> ProgressBar:
    """The run's one progress display: `bar` (rich), `lines` (`ProgressLog`), or `auto`: the bar when stdout
    is a terminal, else lines."""
    if style not in STYLES:
        raise ConfigError(f"callbacks.progress_bar.style: expected one of {list(STYLES)}, got {style!r}")
    if style == "auto":
        style = "bar" if sys.stdout.isatty() else "lines"
    return RichProgressBar() if style == "bar" else ProgressLog(every_n_steps)


def duration(seconds: float | None) -> str:
    """`h:mm:ss` (with days when long), or `?` when it cannot be known (an endless loader)."""
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    return str(timedelta(seconds=round(max(seconds, 0.0))))


class ProgressLog(ProgressBar):
    """A log line every `every_n_steps` optimizer steps and at each validation end (rank 0): epoch, step,
    mean training loss since the last line, learning rate, images/s (all ranks) and the time left in the
    epoch and in the run.

    images/s and the epoch's time left count training only (validation is timed apart); the run's time left
    divides the time since this process started training by its steps, so validation and checkpoints are in.
    Losses stay on the device until a line is written: no host sync per step.
    """

    def __init__(self, every_n_steps: int = 50) -> None:
        super().__init__()
        if int(every_n_steps) < 1:
            raise ConfigError(
                f"callbacks.progress_bar.every_n_steps: expected at least 1, got {every_n_steps}"
            )
        self.every_n_steps = int(every_n_steps)
        self.enabled = True
        self._started = 0.0  # when this process began training, and at which step (resumed runs)
        self._start_step = 0
        self._logged_step = -1
        self._loss: float | None = None  # the last figures written, for lines with nothing new
        self._rate: float | None = None
        self._per_batch: float | None = None
        self._validation_start = 0.0
        self._reset_window()

    def disable(self) -> None:
        self.enabled = False

    def enable(self) -> None:
        self.enabled = True

    def _reset_window(self) -> None:
        self._window_start = time.monotonic()
        self._paused = 0.0  # seconds of validation inside the window
        self._batches = 0
        self._images: int | None = 0  # None: a batch layout `batch_images` does not know (no images/s)
        self._loss_sum: torch.Tensor | None = None
        self._losses = 0

    # -- hooks --------------------------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = time.monotonic()
        self._start_step = trainer.global_step
        self._reset_window()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.enabled:
            return
        self._batches += 1
        try:
            self._images = None if self._images is None else self._images + batch_images(batch)
        except (TypeError, KeyError, IndexError):
            self._images = None
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, torch.Tensor):
            loss = loss.detach().float()
            self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
            self._losses += 1
        step = trainer.global_step
        if step % self.every_n_steps == 0 and step != self._logged_step:
            self._logged_step = step
            log.info(" | ".join(self._training_fields(trainer)))
            self._reset_window()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._validation_start = time.monotonic()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled or trainer.sanity_checking:
            return
        took = time.monotonic() - self._validation_start
        self._paused += took
        metrics = {
            k: float(v)
            for k, v in trainer.callback_metrics.items()
            if k.startswith("val") and torch.as_tensor(v).numel() == 1
        }
        shown = ", ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items()))
        validation = f"validation ({duration(took)}): {shown or 'no metrics'}"
        if trainer.state.fn != "fit":
            log.info(validation)
            return
        log.info(" | ".join([*self._training_fields(trainer), validation]))

    # -- the line -----------------------------------------------------------------------------------------
    def _training_fields(self, trainer: L.Trainer) -> list[str]:
        """epoch, step, loss, lr, images/s, ETA (epoch and run), from the window since the last line (or the
        last line's figures when nothing has run since)."""
        if self._losses:
            self._loss = float(self._loss_sum) / self._losses
        seconds = time.monotonic() - self._window_start - self._paused
        if self._batches and seconds > 0:
            self._per_batch = seconds / self._batches
            self._rate = self._images * trainer.world_size / seconds if self._images else None
        left_in_epoch = None
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        if self._per_batch is not None and self.total_train_batches != float("inf"):
            left_in_epoch = max(self.total_train_batches - done, 0) * self._per_batch
        steps_done = trainer.global_step - self._start_step
        total_steps = trainer.estimated_stepping_batches
        left_in_run = None
        if steps_done > 0 and total_steps != float("inf"):
            left_in_run = (
                (total_steps - trainer.global_step) * (time.monotonic() - self._started) / steps_done
            )
        epochs = trainer.max_epochs if trainer.max_epochs not in (None, -1) else "?"
        total = int(total_steps) if total_steps != float("inf") else "?"
        lrs = [group["lr"] for optimizer in trainer.optimizers for group in optimizer.param_groups]
        return [
            f"epoch {trainer.current_epoch + 1}/{epochs}",
            f"step {trainer.global_step}/{total}",
            f"loss {self._loss:.4f}" if self._loss is not None else "loss ?",
            f"lr {max(lrs):.2e}" if lrs else "lr ?",
            f"{self._rate:.1f} images/s" if self._rate is not None else "? images/s",
            f"ETA epoch {duration(left_in_epoch)}, run {duration(left_in_run)}",
        ]


class ModelSummaryWithoutFlops(RichModelSummary):
    """Lightning's rich model summary, without its FLOPs column and "Total FLOPs" line.

    Lightning counts FLOPs only by running the module's `example_input_array` at fit start, which piip
    tasks do not set (a forward pass at the highest resolution of a 6B model before FSDP shards it is what
    we avoid), so it printed "Total FLOPs: 0". Showing our count instead would put a second figure with
    another definition beside the one that matters: piip counts multiply-adds by the paper's protocol
    (PAPER.md), already in results.json, the logger's `model/gflops` and `python -m piip.tools.flops`.
    """

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        from rich import get_console
        from rich.table import Table

        columns = [(name, values) for name, values in summary_data if name != "FLOPs"]
        table = Table(header_style=summarize_kwargs.get("header_style", "bold magenta"))
        for name, _ in columns:
            right = name in ("Params", "Params per Device", "In sizes", "Out sizes")
            table.add_column(name, justify="right" if right else "left", style="dim" if name == " " else None)
        for row in zip(*(values for _, values in columns), strict=True):
            table.add_row(*row)
        console = get_console()
        console.print(table)
        grid = Table.grid(expand=True)
        grid.add_column()
        counts = {
            "Trainable params": get_human_readable_count(int(trainable_parameters)),
            "Non-trainable params": get_human_readable_count(int(total_parameters - trainable_parameters)),
            "Total params": get_human_readable_count(int(total_parameters)),
            "Total estimated model params size (MB)": get_formatted_model_size(model_size),
            "Modules in train mode": total_training_modes["train"],
            "Modules in eval mode": total_training_modes["eval"],
        }
        for label, value in counts.items():
            grid.add_row(f"[bold]{label}[/]: {value}")
        console.print(grid)
