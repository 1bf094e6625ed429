"""Optimisation shared by every task: AdamW parameter groups with layer-wise lr decay, per-step schedules.

Layer-wise decay follows the backbone's own `layer_id` (branches of different depth share one depth scale,
PAPER.md §3.7). Each group gets its final `lr` written in, instead of timm's `lr_scale`, because only timm's
schedulers read `lr_scale`; the torch `LambdaLR` used here multiplies each group's own initial lr.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from piip.errors import ConfigError
from piip.models.checks import is_number, number_in, optional_whole_number, positive_number


@dataclass
class OptimConfig:
    """`task.optim` in the configs. Learning rates are absolute (not scaled by batch size)."""

    lr: float = 1e-3
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    layer_decay: float = 1.0  # lr of depth d = lr * layer_decay ** (num_layers + 1 - d)
    new_module_lr_scale: float = 1.0  # interactions, merges and heads (parameters outside `branches.`)
    decay_norms_and_biases: bool = False  # upstream classification decays everything; we exclude by default
    schedule: Literal["cosine", "step", "poly", "constant"] = "cosine"
    warmup_epochs: float = 0.0
    warmup_steps: int | None = None  # overrides warmup_epochs when set
    warmup_start_factor: float = 1e-3
    min_lr_ratio: float = 0.0  # cosine/poly floor, as a fraction of each group's lr
    poly_power: float = 1.0
    step_milestones: list[float] = field(default_factory=list)  # in epochs
    step_gamma: float = 0.1
    gradient_clip: float | None = None  # max global L2 norm; None = off
    ema_decay: float | None = None  # None = no EMA of weights

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OptimConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"task.optim: unknown field(s) {unknown}; expected some of {sorted(known)}")
        data = dict(data)
        if "betas" in data:
            data["betas"] = tuple(data["betas"])
        config = cls(**data)
        if config.schedule not in ("cosine", "step", "poly", "constant"):
            raise ConfigError(
                f"task.optim.schedule: expected cosine, step, poly or constant, got {config.schedule!r}"
            )
        if not is_number(config.layer_decay) or not 0 < config.layer_decay <= 1:
            raise ConfigError(f"task.optim.layer_decay: expected a value in (0, 1], got {config.layer_decay}")
        config.check_values()
        return config

    def check_values(self) -> None:
        """Refuse values torch would only trip over at the first step (or never: a negative lr trains
        backwards without a word), naming the key; numbers are stored as plain floats/ints."""
        key = "task.optim."
        self.lr = positive_number(self.lr, key + "lr")
        self.weight_decay = number_in(self.weight_decay, key + "weight_decay", 0)
        if not isinstance(self.betas, tuple) or len(self.betas) != 2:
            raise ConfigError(f"{key}betas: expected two numbers in [0, 1), got {self.betas!r}")
        self.betas = tuple(number_in(b, key + "betas", 0, 1, high_open=True) for b in self.betas)
        self.eps = positive_number(self.eps, key + "eps")
        self.new_module_lr_scale = number_in(self.new_module_lr_scale, key + "new_module_lr_scale", 0)
        self.warmup_epochs = number_in(self.warmup_epochs, key + "warmup_epochs", 0)
        self.warmup_steps = optional_whole_number(self.warmup_steps, key + "warmup_steps", minimum=0)
        factor = key + "warmup_start_factor"
        self.warmup_start_factor = number_in(self.warmup_start_factor, factor, 0, 1)
        self.min_lr_ratio = number_in(self.min_lr_ratio, key + "min_lr_ratio", 0, 1)
        self.poly_power = positive_number(self.poly_power, key + "poly_power")
        milestones = self.step_milestones
        if not isinstance(milestones, list | tuple):
            raise ConfigError(f"{key}step_milestones: expected a list of epochs, got {milestones!r}")
        self.step_milestones = [number_in(m, key + "step_milestones", 0) for m in self.step_milestones]
        self.step_gamma = positive_number(self.step_gamma, key + "step_gamma")
        if self.gradient_clip is not None:
            self.gradient_clip = positive_number(self.gradient_clip, key + "gradient_clip")
        if self.ema_decay is not None:
            self.ema_decay = number_in(self.ema_decay, key + "ema_decay", 0, 1, high_open=True)  # 0: off


def parameter_groups(
    module: nn.Module,
    config: OptimConfig,
    layer_id: Callable[[str], float],
    num_layers: int,
    no_weight_decay: set[str],
    prefix: str = "",
) -> list[dict[str, Any]]:
    """AdamW groups keyed by (depth, decay, new); each group carries its absolute `lr` and a readable name.

    `layer_id` and `no_weight_decay` speak the backbone's parameter names; `prefix` is the backbone's name
    inside `module` (e.g. "backbone.") so task heads outside it count as new modules at full depth.
    """
    groups: dict[tuple[float, bool, bool], dict[str, Any]] = {}
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        inside = name.startswith(prefix)
        local = name[len(prefix) :] if inside else name
        depth = layer_id(local) if inside else float(num_layers + 1)
        new = not (inside and local.startswith("branches."))
        decay = config.decay_norms_and_biases or not (
            param.ndim <= 1 or (inside and local in no_weight_decay)
        )
        key = (depth, decay, new)
        if key not in groups:
            scale = config.layer_decay ** (num_layers + 1 - depth)
            if new:
                scale *= config.new_module_lr_scale
            groups[key] = {
                "name": f"depth{depth:g}_{'decay' if decay else 'no_decay'}{'_new' if new else ''}",
                "params": [],
                "lr": config.lr * scale,
                "weight_decay": config.weight_decay if decay else 0.0,
            }
        groups[key]["params"].append(param)
    return [groups[k] for k in sorted(groups)]


def build_optimizer(groups: list[dict[str, Any]], config: OptimConfig) -> torch.optim.AdamW:
    # "name" is ours; torch keeps unknown group keys, which LearningRateMonitor uses as labels.
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps)


def lr_factor(config: OptimConfig, total_steps: int, steps_per_epoch: float) -> Callable[[int], float]:
    """Multiplier of each group's lr at optimizer step `t`: linear warmup, then the configured schedule."""
    warmup = config.warmup_steps
    if warmup is None:
        warmup = round(config.warmup_epochs * steps_per_epoch)
    warmup = min(warmup, max(total_steps - 1, 0))
    milestones = [round(m * steps_per_epoch) for m in config.step_milestones]
    floor = config.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            start = config.warmup_start_factor
            return start + (1.0 - start) * step / warmup
        progress = min((step - warmup) / max(total_steps - warmup, 1), 1.0)
        if config.schedule == "cosine":
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
        if config.schedule == "poly":
            return floor + (1.0 - floor) * (1.0 - progress) ** config.poly_power
        if config.schedule == "step":
            return config.step_gamma ** sum(step >= m for m in milestones)
        return 1.0

    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: OptimConfig, total_steps: int, steps_per_epoch: float
) -> dict[str, Any]:
    """A Lightning scheduler dict stepped every optimizer step (the paper's schedules are per iteration)."""
    if total_steps <= 0:
        raise ConfigError(f"trainer: the run has {total_steps} optimizer steps; expected at least one")
    scheduler = LambdaLR(optimizer, lr_factor(config, total_steps, steps_per_epoch))
    return {"scheduler": scheduler, "interval": "step", "frequency": 1}
