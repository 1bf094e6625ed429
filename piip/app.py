"""From a composed run config (conf/train.yaml) to Lightning objects: what train.py and evaluate.py share."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf, open_dict

from piip import sharded_checkpoint as sharded
from piip.config import plain
from piip.models.config import ConfigError
from piip.tasks.base import PIIPTask

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used for this run; the message names the file."""


def run_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved run config without Hydra's own section: what a checkpoint stores about itself."""
    return {k: plain(cfg[k]) for k in cfg if k != "hydra"}


def configure_cpu_math() -> None:
    """Flush subnormal floats to zero on CPU, before any thread pool starts (threads inherit the flag).

    Zero-initialised gammas and near-zero deformable offsets produce subnormals early in training, which
    x86 CPUs process ~100x slower: piip_tiny steps measured 4-5 s instead of 33 ms. No effect on GPU math.
    """
    torch.set_flush_denormal(True)


# -- building ---------------------------------------------------------------------------------------------
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
    if not loggers:  # `logger=none`: the LR monitor has nowhere to write and would refuse to start
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, _convert_="all")


def close_loggers(trainer: L.Trainer) -> None:
    """End the W&B run, so the next job of a multirun (same process) starts its own run."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()


# -- checkpoints ------------------------------------------------------------------------------------------
def read_checkpoint(path: str | Path, weights: bool = True) -> dict[str, Any]:
    """A Lightning checkpoint written by piip, loaded with `weights_only=True`: one file, or the sharded
    folder of `trainer=fsdp` (`weights=False` reads only its shapes)."""
    path = Path(path)
    if not path.is_file() and not sharded.is_sharded_checkpoint(path):
        raise CheckpointError(f"checkpoint not found: {path} (expected a .ckpt file or a sharded folder)")
    try:
        if path.is_dir():
            checkpoint = sharded.read_sharded_checkpoint(path, weights=weights)
        else:  # memory-mapped: checking a resume reads key names and shapes, not gigabytes of weights
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for corrupt files
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from err
    if not isinstance(checkpoint, dict) or "run_config" not in checkpoint.get("hyper_parameters", {}):
        raise CheckpointError(f"{path} is not a piip training checkpoint (no hyper_parameters.run_config)")
    return checkpoint


def find_last_checkpoint(run_dir: str | Path) -> Path | None:
    """Newest `last*.ckpt` under the run's checkpoint folder (Lightning versions them last-v1, ...)."""

    def saved_at(path: Path) -> float:  # a sharded folder's own mtime does not change when it is rewritten
        return (path / sharded.META_FILE if path.is_dir() else path).stat().st_mtime

    found = Path(run_dir, "checkpoints").glob("last*.ckpt")
    candidates = sorted((p for p in found if not p.name.endswith(sharded.CONSOLIDATED_SUFFIX)), key=saved_at)
    return candidates[-1] if candidates else None


def check_weights_fit(path: str | Path, checkpoint: dict[str, Any], module: torch.nn.Module) -> None:
    """Refuse a checkpoint of another model with a message naming both models and the first mismatches."""
    saved = checkpoint["state_dict"]
    expected = module.state_dict()
    problems = [f"missing {k}" for k in expected if k not in saved]
    problems += [f"unexpected {k}" for k in saved if k not in expected]
    problems += [
        f"{k}: checkpoint {tuple(saved[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in saved and saved[k].shape != v.shape
    ]
    if problems:
        saved_model = checkpoint["hyper_parameters"]["run_config"].get("model", {}).get("name")
        raise CheckpointError(
            f"checkpoint {path} holds model {saved_model!r}, which does not fit the configured model "
            f"({len(problems)} mismatches, e.g. {'; '.join(problems[:3])}). Pick the matching model=… or "
            "another checkpoint."
        )


def load_task_from_checkpoint(
    ckpt_path: Path, data_overrides: dict[str, Any] | None = None
) -> tuple[DictConfig, dict[str, Any], PIIPTask]:
    """Rebuild the run config (`task.data` fields replaced by `data_overrides`), backbone settings and the
    trained module."""
    checkpoint = read_checkpoint(ckpt_path)
    hparams = checkpoint["hyper_parameters"]
    saved = OmegaConf.create(hparams["run_config"])
    for key, value in (data_overrides or {}).items():  # whole values: an `eval` set replaces the saved one
        saved.task.data[key] = value
    backbone = hparams["backbone"]
    module = build_task(saved, backbone, load_pretrained=False)
    load_weights(module, ckpt_path, checkpoint)
    module.on_load_checkpoint(checkpoint)
    return saved, backbone, module


def resume_path(cfg: DictConfig, run_dir: Path) -> str | None:
    """The checkpoint to resume from (`ckpt_path`: null, a path, or `last`); None when there is none yet,
    so the run starts fresh, pretrained weights included."""
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path != "last":
        return ckpt_path
    last = find_last_checkpoint(run_dir)
    if last is None:
        log.warning("ckpt_path=last: no last*.ckpt in %s/checkpoints yet; starting from scratch", run_dir)
        return None
    return str(last)


def check_resume(ckpt_path: str, module: torch.nn.Module) -> None:
    check_weights_fit(ckpt_path, read_checkpoint(ckpt_path, weights=False), module)
    log.info("resuming from %s", ckpt_path)


# -- stages -----------------------------------------------------------------------------------------------
def stage_configs(cfg: DictConfig) -> list[tuple[str, DictConfig]]:
    """One run config per training stage, in order; `("", cfg)` for a task without `task.stages`.

    `task.stages` maps a stage name to overrides of the whole run config (task fields, trainer, callbacks,
    test_after_fit). Each stage runs in its own folder `<run>/<stage>` with its own checkpoints and logs; a
    later stage starts from the weights of the previous stage's last checkpoint (LLaVA's two stages).
    """
    stages = cfg.task.get("stages")
    if not stages:
        return [("", cfg)]
    if cfg.get("ckpt_path") not in (None, "last"):
        raise ConfigError(
            f"ckpt_path={cfg.ckpt_path}: task {cfg.task.name} runs in stages; resume it with ckpt_path=last"
        )
    base = cfg.copy()
    with open_dict(base):
        del base.task.stages
    root = Path(cfg.trainer.default_root_dir)
    out = []
    for name, overrides in stages.items():
        stage = OmegaConf.merge(base, overrides)
        with open_dict(stage):
            stage.trainer.default_root_dir = str(root / name)
            stage.run_name = f"{cfg.run_name}_{name}"
        out.append((str(name), stage))
    return out


def finished_stage(cfg: DictConfig) -> dict[str, Any] | None:
    """The results record of a stage that already ran to the end, when resuming with ckpt_path=last."""
    results = Path(cfg.trainer.default_root_dir, "results.json")
    if cfg.get("ckpt_path") != "last" or not results.is_file():
        return None
    return json.loads(results.read_text())


def load_weights(module: torch.nn.Module, path: str | Path, checkpoint: dict[str, Any] | None = None) -> None:
    """A checkpoint's weights (read from `path` unless given), checked to fit; no optimizer state. Used to
    start from a previous stage and to rebuild a trained module."""
    checkpoint = checkpoint if checkpoint is not None else read_checkpoint(path)
    check_weights_fit(path, checkpoint, module)
    module.load_state_dict(checkpoint["state_dict"])
    log.info("initialised the model from %s", path)


# -- results ----------------------------------------------------------------------------------------------
def complexity(cfg: DictConfig) -> dict[str, float | None]:
    """Params and FLOPs of the model, as built and as the paper counts (piip.tools.flops)."""
    from piip.tools.flops import flops_report

    try:
        return flops_report(cfg)
    except Exception as err:  # noqa: BLE001 - counting must never stop a training run
        log.warning("could not count params/FLOPs: %s", err)
        return {"params_m": None, "gflops": None, "paper_params_m": None, "paper_gflops": None}


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float, torch.Tensor)) and k}


def results_record(
    cfg: DictConfig, backbone: dict[str, Any], metrics: dict[str, float], score: float | None, **extra: Any
) -> dict[str, Any]:
    """The contract read by `piip.tools.sweep_summary`."""
    from hydra.core.hydra_config import HydraConfig

    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    return {
        "model": cfg.model.name,
        "task": cfg.task.name,
        "resolution": list(backbone["resolutions"]),
        "monitor": cfg.task.monitor.metric,
        "score": score,
        "metrics": metrics,
        "overrides": overrides,
        **extra,
    }
