"""From composed Hydra configs to the plain backbone settings (`PIIPConfig` fields) that `piip.models` builds.

A model config (`conf/model/*.yaml`) holds its branches as `branch0 … branchN-1` (highest resolution
first, each composed from `conf/branch/`), the shared backbone fields, and `by_task`: the settings the paper
uses per task kind (resolutions, windows, interaction options). Precedence, low to high:
task defaults (`task.backbone`) < model < `model.by_task[task.kind]` < `model.by_task[task.name]`
< the `resolution` group.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from piip.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
MODEL_META_KEYS = ("name", "by_task", "paper_protocol", "description")


def compose(config_name: str = "flops", overrides: list[str] | None = None) -> DictConfig:
    """Compose a config from `conf/` without running an application (notebooks, tools, tests)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides or [])


def compose_run(config_name: str, overrides: list[str] | None = None) -> DictConfig:
    """Compose as `@hydra.main` would for an application, Hydra's own section set (so `${hydra:…}` values
    resolve), for tools that compose more than one run config (`piip.tools.convert`). The job's output
    folder is the working directory: these tools write only the files they are told to."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import flag_override

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name=config_name, overrides=overrides or [], return_hydra_config=True)
    with flag_override(cfg, ["readonly", "struct"], [False, False]):
        cfg.hydra.runtime.output_dir = "."
    HydraConfig.instance().set_config(cfg)
    return cfg


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def backbone_dict(cfg: DictConfig) -> dict[str, Any]:
    """The model's fields for `cfg.task`, with branches gathered into a list (plain data, resolved)."""
    model = OmegaConf.to_container(cfg.model, resolve=True)
    # only the task fields that shape the model: the rest (data, optim) may refer to keys of train.yaml
    task_node = cfg.get("task") or {}
    task = {k: plain(task_node[k]) for k in ("name", "kind", "backbone") if k in task_node}
    kind = task.get("kind", "detection")
    by_task = model.get("by_task") or {}
    data = _merge(task.get("backbone") or {}, {k: v for k, v in model.items() if k not in MODEL_META_KEYS})
    for key in (kind, task.get("name")):  # the task kind first, then settings for this exact task
        data = _merge(data, by_task.get(key) or {})
    resolution = cfg.get("resolution")
    if resolution is not None:
        data["resolutions"] = list(resolution.sizes)
    branch_keys = sorted(
        (k for k in data if k.startswith("branch") and k[6:].isdigit()), key=lambda k: int(k[6:])
    )
    if [int(k[6:]) for k in branch_keys] != list(range(len(branch_keys))):
        raise ConfigError(
            f"model {model.get('name')}: branches must be named branch0..branchN-1, got {branch_keys}"
        )
    data["branches"] = [data.pop(k) for k in branch_keys]
    if data.get("resolutions") is None:
        raise ConfigError(
            f"model {model.get('name')} has no resolutions for task kind {kind!r}: pick one with resolution=…"
        )
    return data


def paper_twin_dict(cfg: DictConfig, backbone: dict[str, Any] | None = None) -> dict[str, Any]:
    """The model the paper's FLOP/param protocol counts (PAPER.md §4.1-4.2).

    `twin` (DeiT/InternViT/AugReg rows): the classification twin — pos-embeds sized at each branch's
    resolution, GN/Linear merging, LayerNorm + 1000-way head; classification tasks are counted as
    configured (per-branch heads, no merging), as upstream counts its classification configs.
    `backbone` (ConvNeXt rows): the task backbone up to branch merging. `encoder` (LLaVA rows): the vision
    encoder without merging. `backbone`: the run's settings when already derived (`backbone_dict`).
    """
    data = copy.deepcopy(backbone) if backbone is not None else backbone_dict(cfg)
    protocol = paper_protocol(cfg)
    if protocol == "twin" and cfg.task.get("kind") == "classification":
        data.update(pos_embed_at_resolution=True)
    elif protocol == "twin":
        many = len(data["branches"]) > 1
        data.update(
            merge="classification" if many else "none",
            head="classification",
            classifier="merged",
            num_classes=1000,
            pos_embed_at_resolution=True,
            out_interaction_indexes=[],
        )
    elif protocol in ("backbone", "encoder"):
        data.update(head="none")
    else:
        raise ConfigError(f"model.paper_protocol: expected twin, backbone or encoder, got {protocol!r}")
    return data


def paper_protocol(cfg: DictConfig) -> str:
    return cfg.model.get("paper_protocol", "twin")


# -- resolvers used by conf/train.yaml and conf/logger -----------------------------------------------------
def _resolution_tag(*, _root_: DictConfig) -> str:
    """`64_48_32`: the resolutions this run builds (model/task defaults or the `resolution` group)."""
    return "_".join(str(r) for r in backbone_dict(_root_)["resolutions"])


def wandb_offline() -> bool:
    """Offline unless the user configured W&B: no network call and no login prompt otherwise."""
    import netrc
    import os

    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "dryrun", "disabled"):
        return True
    if os.environ.get("WANDB_API_KEY") or mode == "online":
        return False
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is None
    except (OSError, netrc.NetrcParseError):
        return True


def auto_precision() -> str:
    """bf16 mixed precision where a GPU is present, full precision on CPU."""
    import torch

    return "bf16-mixed" if torch.cuda.is_available() else "32-true"


for _name, _fn in (
    ("piip.resolution", _resolution_tag),
    ("piip.wandb_offline", wandb_offline),
    ("piip.auto_precision", auto_precision),
):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _fn)
