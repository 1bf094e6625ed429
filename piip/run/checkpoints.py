"""Reading piip's Lightning checkpoints (one file, or the sharded folder of `trainer=fsdp`), checking that
they fit a model, resuming, and rebuilding a trained module from a checkpoint alone."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from piip.errors import CheckpointError
from piip.run import sharded
from piip.run.build import build_task
from piip.tasks.base import PIIPTask
from piip.tasks.finite import checkpoint_candidates

log = logging.getLogger(__name__)


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
    newest_first = checkpoint_candidates([Path(run_dir, "checkpoints")])
    lasts = (p for p in newest_first if p.name.startswith("last"))
    return next((p for p in lasts if not p.name.endswith(sharded.CONSOLIDATED_SUFFIX)), None)


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


def load_weights(module: torch.nn.Module, path: str | Path, checkpoint: dict[str, Any] | None = None) -> None:
    """A checkpoint's weights (read from `path` unless given), checked to fit; no optimizer state. Used to
    start from a previous stage and to rebuild a trained module."""
    checkpoint = checkpoint if checkpoint is not None else read_checkpoint(path)
    check_weights_fit(path, checkpoint, module)
    module.load_state_dict(checkpoint["state_dict"])
    log.info("initialised the model from %s", path)
