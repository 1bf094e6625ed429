"""Official PIIP checkpoints -> piip checkpoints that `evaluate.py ckpt_path=`, `train.py init_from=` and
`piip.tools.predict` use as they are.

Steps: read the file as released (`state_dict` / `model` / `module` containers, a `module.` prefix, a
DeepSpeed `mp_rank_00_model_states.pt` or its folder); build the configured task on the meta device (no
memory for 6B weights); rename every key (backbone: `piip.models.convert.official`, heads: the task's
`from_official_heads`); refuse any key that finds no place and any piip tensor left without one; write a
Lightning checkpoint with the run config and where the weights came from.

Released 4-branch checkpoints hold a ViT-S where the paper's TSBL has a ViT-T (PAPER.md §7.1): when the
checkpoint does not fit `model=X` but fits `model=X_upstream`, that model is used and named.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from piip.data.files import write_torch
from piip.errors import CheckpointError
from piip.models.branches.base import UNUSED_BY_OFFICIAL
from piip.models.branches.checkpoint import HF_INDEX_FILES, HF_WEIGHT_FILES, read_state_dict
from piip.models.convert.official import Conversion, convert_backbone
from piip.models.meta import init_free_meta
from piip.run.build import build_task, run_config
from piip.run.config import CONF_DIR, backbone_dict, compose_run
from piip.run.released import for_experiment
from piip.tasks.base import PIIPTask

log = logging.getLogger("piip")
StateDict = dict[str, torch.Tensor]
DEEPSPEED_FILE = "mp_rank_00_model_states.pt"
CONTAINERS = ("state_dict", "model", "module")  # mmdet/mmseg, the classification code, DeepSpeed


@dataclass
class ConversionReport:
    source: str
    out: str
    model: str
    tensors: int
    unused: dict[str, str] = field(default_factory=dict)
    official_config: str | None = None


def read_official(path: str | Path, trust_pickle: bool = False) -> StateDict:
    """The tensors of an official checkpoint, unwrapped and without DeepSpeed's `module.` prefix; a Hugging
    Face folder (PIIP-LLaVA's releases: safetensors, possibly sharded) or `.safetensors` file as stored."""
    path = Path(path)
    hf_folder = path.is_dir() and any((path / n).is_file() for n in HF_WEIGHT_FILES + HF_INDEX_FILES)
    if hf_folder or (path.is_file() and path.suffix == ".safetensors"):
        try:
            return read_state_dict(path)
        except (ValueError, OSError) as err:
            raise CheckpointError(f"{path}: {err}") from err
    if path.is_dir():
        found = sorted(path.rglob(DEEPSPEED_FILE))
        if not found:
            raise CheckpointError(
                f"{path}: a folder without {DEEPSPEED_FILE} (a DeepSpeed checkpoint) or Hugging Face weights "
                f"({', '.join(HF_WEIGHT_FILES + HF_INDEX_FILES)})"
            )
        path = found[-1]
    if not path.is_file():
        raise CheckpointError(f"official checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle, mmap=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for unreadable files
        hint = "" if trust_pickle else " If you trust the file, add trust_pickle=true (it runs pickled code)."
        raise CheckpointError(f"cannot read {path} as a weights-only checkpoint: {err}.{hint}") from err
    for key in CONTAINERS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"{path}: expected a dict of tensors (optionally under {', '.join(CONTAINERS)})"
        )
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: holds no tensors under {', '.join(CONTAINERS)} or at its top level")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k.removeprefix("module."): v for k, v in tensors.items()}
    return tensors


def convert_state(task: PIIPTask, state: StateDict) -> Conversion:
    """Every official key -> the task's names: the task says which official keys are its backbone's
    (`split_official`), the backbone converter renames those, the task renames the rest."""
    backbone, heads = task.split_official(state)
    result = convert_backbone(task.backbone, backbone)
    result.state_dict = {f"backbone.{k}": v for k, v in result.state_dict.items()}
    result.unplaced = [f"backbone.{k}" if k in backbone else k for k in result.unplaced]
    result.unused = {f"backbone.{k}": why for k, why in result.unused.items()}
    result.passed_through = {f"backbone.{k}": f"backbone.{v}" for k, v in result.passed_through.items()}
    placed, unplaced = task.from_official_heads(heads)
    for key, value in placed.items():
        if key.startswith(UNUSED_BY_OFFICIAL):  # a head tensor upstream never reads, with the reason
            name, _, why = key.removeprefix(UNUSED_BY_OFFICIAL).partition("|")
            result.unused[name] = why
        else:
            result.state_dict[key] = value
    result.unplaced += unplaced
    return result


def fit_problems(task: PIIPTask, conversion: Conversion) -> list[str]:
    """Why the converted tensors do not make exactly this task's state dict (empty when they do), the most
    telling first: official keys nothing places, then shapes that differ, then piip tensors left empty."""
    own = task.state_dict()
    converted = conversion.state_dict
    unknown = [conversion.passed_through.get(k, k) for k in converted if k not in own]
    problems = [f"official key with no place in piip: {k}" for k in [*conversion.unplaced, *unknown]]
    problems += [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in converted.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    problems += [f"piip tensor the checkpoint does not provide: {k}" for k in own if k not in converted]
    return problems


def build_on_meta(cfg: DictConfig) -> PIIPTask:
    """The configured task with every weight on the meta device (shapes and names, no memory)."""
    with init_free_meta():
        return build_task(cfg, backbone_dict(cfg), load_pretrained=False)


def candidate_models(cfg: DictConfig) -> list[str]:
    """The configured model, then its `_upstream` variant when conf/model has one."""
    name = cfg.model.name
    variant = f"{name}_upstream"
    return [name] + ([variant] if (CONF_DIR / "model" / f"{variant}.yaml").is_file() else [])


def official_semantics(cfg: DictConfig) -> list[str]:
    """Overrides that make the converted model compute what the official one computed.

    - Upstream's per-branch classification heads read the first patch token, not the cls token (PAPER.md
      §7.2): the released ImageNet weights were trained that way, so their conversion classifies the same.
    - The EMA copy of classification runs is a training aid; official checkpoints convert without it.
    """
    extra = []
    if OmegaConf.select(cfg, "task.backbone.classifier") == "per_branch":
        extra.append("task.backbone.classifier_token=first_patch")
    if OmegaConf.select(cfg, "task.optim.ema_decay"):
        extra.append("task.optim.ema_decay=null")
    for override in extra:
        log.info("converting with %s (as the official model computes)", override)
    return extra


def match(state: StateDict, overrides: list[str]) -> tuple[DictConfig, PIIPTask, Conversion]:
    """The run config, task (on meta) and converted tensors of the first candidate model that `state` fits
    exactly; a `CheckpointError` listing the problems of each candidate otherwise."""
    cfg = compose_run("train", overrides)
    extra = official_semantics(cfg)
    if extra:
        overrides = [*overrides, *extra]
        cfg = compose_run("train", overrides)
    attempts: dict[str, list[str]] = {}
    for model in candidate_models(cfg):
        run = cfg if model == cfg.model.name else compose_run("train", [*overrides, f"model={model}"])
        task = build_on_meta(run)
        conversion = convert_state(task, state)
        attempts[model] = fit_problems(task, conversion)
        if not attempts[model]:
            if model != cfg.model.name:
                log.warning(
                    "the checkpoint fits model=%s, not model=%s: converted with it", model, cfg.model.name
                )
            return run, task, conversion
    detail = "\n".join(
        f"model={m}: {len(p)} problems, e.g.\n  " + "\n  ".join(p[:8]) for m, p in attempts.items()
    )
    raise CheckpointError(f"the checkpoint does not convert to the configured model:\n{detail}")


def convert(
    src: str | Path, out: str | Path, overrides: list[str], trust_pickle: bool = False
) -> ConversionReport:
    """Convert `src` for the run that `overrides` compose (model/task/resolution or experiment) and write the
    piip checkpoint `out`."""
    state = read_official(src, trust_pickle)
    try:
        run, task, conversion = match(state, overrides)
    except CheckpointError as err:
        raise CheckpointError(f"{src}: {err}") from err
    released = for_experiment(run.get("experiment_name"))
    official_config = released.official_config if released else None
    write_torch(out, checkpoint_record(run, task, conversion, src, official_config))
    report = ConversionReport(
        str(src), str(out), run.model.name, len(conversion.state_dict), conversion.unused, official_config
    )
    log.info("wrote %s: %d tensors from %s (model=%s)", out, report.tensors, src, report.model)
    return report


def checkpoint_record(
    cfg: DictConfig, task: PIIPTask, conversion: Conversion, src: str | Path, official_config: str | None
) -> dict[str, Any]:
    """What Lightning writes, minus the training state: weights, hyper-parameters (the run config) and
    where they came from."""
    import lightning

    hparams = dict(task.hparams)
    hparams["run_config"] = run_config(cfg)
    own = task.state_dict()
    state = {k: conversion.state_dict[k].to(own[k].dtype).contiguous() for k in own}
    return {
        "state_dict": state,
        "hyper_parameters": hparams,
        "pytorch-lightning_version": lightning.__version__,
        "epoch": 0,
        "global_step": 0,
        "piip_conversion": {
            "source": str(Path(src).resolve()),
            "official_config": official_config,
            "model": cfg.model.name,
            "unused_official_tensors": conversion.unused,
        },
    }
