"""Parameters (M) and FLOPs (G, multiply-accumulates) of a backbone, as built and as the paper counts them.

`paper`: the paper's counting protocol (see `piip.analysis.complexity` and PAPER.md §4), applied to the model
the paper counts (`piip.run.config.paper_twin`), comparable with the released tables. `actual`: the backbone
as instantiated for the task. Both are built on the meta device, so counting a 6B model allocates nothing.
"""

from __future__ import annotations

from typing import Any

import torch

from piip.analysis.complexity import Complexity, count
from piip.models import PIIPBackbone, PIIPConfig
from piip.models.meta import init_free_meta


def measure(
    data: dict[str, Any], protocol: str, deform_grid_of_first_interaction: bool = False
) -> Complexity:
    """Count the backbone `data` (PIIPConfig fields) describes, on one image at its highest resolution."""
    config = PIIPConfig.from_dict(data)
    with init_free_meta():
        model = PIIPBackbone(config).eval()
        size = config.resolutions[0]
        images = torch.empty(1, 3, size, size)
    return count(model, images, protocol, deform_grid_of_first_interaction)


def paper_count(twin: dict[str, Any], paper_protocol: str) -> Complexity:
    """The paper protocol on its twin model; LLaVA encoders follow the LLaVA script's deformable-grid rule."""
    return measure(twin, "paper", deform_grid_of_first_interaction=paper_protocol == "encoder")


def flops_report(backbone: dict[str, Any], paper: Complexity) -> dict[str, float]:
    """The backbone as built, counted here, beside its `paper_count`, rounded as `results.json` and the
    flops tool report them."""
    actual = measure(backbone, "actual")
    return {
        "params_m": round(actual.params_m, 4),
        "gflops": round(actual.gflops, 4),
        "paper_params_m": round(paper.params_m, 4),
        "paper_gflops": round(paper.gflops, 4),
    }
