"""Multi-stage runs (PIIP-LLaVA's pretrain -> finetune): one run config per stage, each in its own folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from piip.errors import ConfigError


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
