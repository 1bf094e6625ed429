"""What a run reports: metrics as plain floats, params and FLOPs, and the results record
`piip.tools.sweep_summary` reads."""

from __future__ import annotations

import logging
from typing import Any

import torch
from omegaconf import DictConfig

from piip.analysis import flops
from piip.analysis.complexity import Complexity
from piip.run.config import backbone_dict, paper_protocol, paper_twin_dict

log = logging.getLogger(__name__)


def paper_complexity(cfg: DictConfig, backbone: dict[str, Any] | None = None) -> Complexity:
    """The paper protocol's count of the configured model (its twin, `paper_twin_dict`); `backbone`: the
    run's settings when already derived."""
    twin = paper_twin_dict(cfg, backbone)
    return flops.paper_count(twin, paper_protocol(cfg))


def flops_report(cfg: DictConfig, backbone: dict[str, Any] | None = None) -> dict[str, float]:
    """Params and FLOPs of the model, as built and as the paper counts them (`piip.analysis.flops`);
    `backbone`: the run's settings when already derived."""
    backbone = backbone if backbone is not None else backbone_dict(cfg)
    return flops.flops_report(backbone, paper_complexity(cfg, backbone))


def complexity(cfg: DictConfig, backbone: dict[str, Any]) -> dict[str, float | None]:
    """`flops_report`, or None figures with a warning: counting must never stop a training run."""
    try:
        return flops_report(cfg, backbone)
    except Exception as err:  # noqa: BLE001
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
