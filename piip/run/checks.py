"""Checks of the trainer settings of a composed run config, before Lightning reads them.

Lightning accepts some bad values without a word (`max_epochs: 0` trains nothing and then tests; `-1`
without `max_steps` trains forever) and refuses others with messages that name its own argument, not the
config key to change. `check_trainer_config` names the key the user sets: `task.epochs` rather than
`trainer.max_epochs` when the trainer config only interpolates it.
"""

from __future__ import annotations

import re
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from piip.errors import ConfigError
from piip.models.checks import is_int, is_number, whole_number

_INTERPOLATION = re.compile(r"^\$\{(?:oc\.select:)?([\w.]+)(?:,[^}]*)?\}$")


def check_trainer_config(cfg: DictConfig) -> None:
    """Refuse trainer settings that cannot run as meant (devices, nodes, epochs, steps, validation
    interval, gradient accumulation), naming the config key the value comes from."""
    trainer = cfg.get("trainer")
    if trainer is None:
        return
    devices, key = setting(cfg, "trainer.devices")
    check_devices(devices, key)
    nodes, key = setting(cfg, "trainer.num_nodes")
    if nodes is not None:
        whole_number(nodes, key)
    steps, steps_key = setting(cfg, "trainer.max_steps")
    if steps not in (None, -1) and not _positive_int(steps):
        raise ConfigError(f"{steps_key}: expected a whole number >= 1 (or -1: no limit), got {steps!r}")
    epochs, key = setting(cfg, "trainer.max_epochs")
    if epochs not in (None, -1) and not _positive_int(epochs):
        raise ConfigError(
            f"{key}: expected a whole number >= 1 (or -1: until {steps_key}), got {epochs!r}; 0 would train "
            "nothing"
        )
    if epochs == -1 and steps in (None, -1):
        raise ConfigError(f"{key}=-1 trains until {steps_key}, which is {steps}: the run would never end")
    every, key = setting(cfg, "trainer.check_val_every_n_epoch")
    if every is not None:
        whole_number(every, key)
    interval, key = setting(cfg, "trainer.val_check_interval")
    if interval is not None and not (is_number(interval) and interval > 0):
        raise ConfigError(
            f"{key}: expected a fraction of an epoch in (0, 1] or a number of training batches, "
            f"got {interval!r}"
        )
    accumulate, key = setting(cfg, "trainer.accumulate_grad_batches")
    if accumulate is not None:
        whole_number(accumulate, key)


def _positive_int(value: Any) -> bool:
    return is_int(value) and value >= 1


def setting(cfg: DictConfig, key: str) -> tuple[Any, str]:
    """The resolved value of `key` and the key a user sets for it: the target of a plain interpolation
    (`max_epochs: ${task.epochs}` -> `task.epochs`), else `key` itself."""
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent)
    if not isinstance(node, DictConfig) or leaf not in node:
        return None, key
    raw = OmegaConf.to_container(node, resolve=False).get(leaf)
    match = _INTERPOLATION.match(raw) if isinstance(raw, str) else None
    try:
        value = node[leaf]
    except (
        InterpolationResolutionError
    ):  # e.g. an evaluation-only task without epochs: not this check's to say
        return None, key
    if isinstance(value, ListConfig):
        value = OmegaConf.to_container(value, resolve=True)
    return value, match.group(1) if match else key


def check_devices(value: Any, key: str = "trainer.devices") -> None:
    """`auto`, -1 (every device), a positive count, or a non-empty list of distinct device indexes (also as
    a string such as "0,1"); 0 or an empty list would start no process at all."""
    if value is None or value in ("auto", -1, "-1"):
        return
    if isinstance(value, str) and re.fullmatch(r"\s*\d+\s*(,\s*\d+\s*)*,?\s*", value):
        indexes = [int(v) for v in value.split(",") if v.strip()]
        value = indexes if "," in value else indexes[0]
    if _positive_int(value):
        return
    if (
        isinstance(value, list | tuple)
        and value
        and all(is_int(v) and v >= 0 for v in value)
        and len(set(value)) == len(value)
    ):
        return
    raise ConfigError(
        f"{key}: expected auto, -1 (every device), a positive number of devices or a non-empty list of "
        f"distinct device indexes, got {value!r}"
    )
