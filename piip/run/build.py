"""From a composed run config (conf/train.yaml) to Lightning objects: data module, task, callbacks, loggers,
trainer. What train.py, evaluate.py and the tools share."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.plugins.io import CheckpointIO
from omegaconf import DictConfig, ListConfig, open_dict

from piip.data.files import remove_stray_temps
from piip.errors import ConfigError
from piip.models.numerics import configure_cpu_math  # noqa: F401 - the entry points call it first
from piip.run.checkpoint_io import AtomicCheckpointIO
from piip.run.checks import check_trainer_config
from piip.run.config import plain
from piip.tasks.base import PIIPTask
from piip.tasks.data import TaskData

log = logging.getLogger(__name__)


def run_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved run config without Hydra's own section: what a checkpoint stores about itself."""
    return {k: plain(cfg[k]) for k in cfg if k != "hydra"}


def build_datamodule(cfg: DictConfig, backbone: dict[str, Any]) -> L.LightningDataModule:
    """The task's data module; its input size is the model's highest branch resolution."""
    missing = [key for key in ("data", "module", "optim") if key not in cfg.task]
    if missing:
        raise ConfigError(
            f"task={cfg.task.name}: training needs task.{', task.'.join(missing)}; this task defines only "
            "its backbone settings so far (usable with python -m piip.tools.flops)"
        )
    try:
        return instantiate(cfg.task.data, input_size=backbone["resolutions"][0], _convert_="all")
    except InstantiationException as err:  # show the data module's own message (it names the field or file)
        if isinstance(err.__cause__, ValueError | OSError):
            raise err.__cause__ from None
        raise


def build_task(cfg: DictConfig, backbone: dict[str, Any], load_pretrained: bool) -> PIIPTask:
    """`task.module` names the LightningModule; its hyper-parameters stay plain data (no instantiation)."""
    kwargs = plain(cfg.task.module)
    task_class = get_class(kwargs.pop("_target_"))
    return task_class(
        backbone=backbone,
        optim=plain(cfg.task.optim),
        load_pretrained=load_pretrained,
        grad_checkpointing=bool(cfg.get("grad_checkpointing", False)),
        run_config=run_config(cfg),
        **kwargs,
    )


def connect(task: PIIPTask, data: TaskData) -> None:
    """Introduce a task and its data before fit/validate/test: the data takes what the model fixes about it
    (`data_needs`, e.g. tokens per image), then the task keeps the data (`TaskData`) for evaluation."""
    data.fit_to_task(**task.data_needs())
    task.attach_data(data)


def build_all(cfg: DictConfig, key: str) -> list[Any]:
    """Every entry of a dict of `_target_` configs (callbacks, loggers); null entries are switched off."""
    return [instantiate(node, _convert_="all") for node in (cfg.get(key) or {}).values() if node is not None]


def build_loggers(cfg: DictConfig, resuming: bool) -> list[Any]:
    """The configured loggers. A resumed run (`ckpt_path`, a requeued cluster job) continues its W&B run,
    found by the `latest-run` link under the W&B folder, instead of starting a second one."""
    wandb = (cfg.get("logger") or {}).get("wandb")
    run_id = previous_wandb_run(Path(wandb.save_dir, "wandb")) if resuming and wandb is not None else None
    if run_id is not None:
        cfg = cfg.copy()
        with open_dict(cfg):
            cfg.logger.wandb.id = run_id
            cfg.logger.wandb.resume = "allow"
        log.info("resuming W&B run %s", run_id)
    return build_all(cfg, "logger")


def previous_wandb_run(folder: Path) -> str | None:
    """The id of the newest W&B run written under `folder` (`latest-run` -> `[offline-]run-<time>-<id>`)."""
    latest = folder / "latest-run"
    return latest.resolve().name.rsplit("-", 1)[-1] if latest.is_symlink() else None


def build_trainer(cfg: DictConfig, callbacks: list[L.Callback], loggers: list[Any]) -> L.Trainer:
    """The Trainer, writing single-file checkpoints through `AtomicCheckpointIO` (unless the config brings
    its own CheckpointIO, as a plugin or in the strategy), after `clean_output_folders`."""
    check_trainer_config(cfg)
    # piip's data modules resume mid-epoch themselves (their state_dict), so Lightning's "dataloader is not
    # resumable" warning on such a resume is wrong here
    warnings.filterwarnings("ignore", message=r".*your dataloader is not resumable.*")
    if not loggers:  # `logger=none`: the LR monitor has nowhere to write and would refuse to start
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    clean_output_folders(cfg, callbacks)
    configured = cfg.trainer.get("plugins") or []
    configured = configured if isinstance(configured, ListConfig | list) else [configured]
    plugins = [instantiate(p, _convert_="all") if isinstance(p, DictConfig) else p for p in configured]
    strategy = cfg.trainer.get("strategy")
    own_io = isinstance(strategy, DictConfig) and strategy.get("checkpoint_io") is not None
    if not own_io and not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    return instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=plugins or None, _convert_="all"
    )


def clean_output_folders(cfg: DictConfig, callbacks: list[L.Callback]) -> list[Path]:
    """Delete the temporaries a killed run left (`piip.data.files.remove_stray_temps`) in the folders this
    trainer writes: the run folder and each ModelCheckpoint's folder. This is the one place they are
    cleaned: here, no writer of this run is active yet, and a run (or an evaluation) in another folder is
    never touched."""
    folders = {Path(cfg.trainer.default_root_dir)} if cfg.trainer.get("default_root_dir") else set()
    folders |= {Path(c.dirpath) for c in callbacks if isinstance(c, ModelCheckpoint) and c.dirpath}
    return [removed for folder in sorted(folders) for removed in remove_stray_temps(folder)]


def close_loggers(trainer: L.Trainer) -> None:
    """End the W&B run, so the next job of a multirun (same process) starts its own run."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()
