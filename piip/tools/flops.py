"""Parameters (M) and FLOPs (G, multiply-accumulates) of a model for a task and resolution.

    python -m piip.tools.flops model=piip_sbl task=coco resolution=1568_896_672 [format=json]

`paper`: the paper's counting protocol (see `piip.tools.complexity` and PAPER.md §4), comparable with the
released tables. `actual`: the backbone as instantiated for the task. Both are built on the meta device.
"""

from __future__ import annotations

import json

import hydra
import torch
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from piip.cli import quote_resolution_overrides
from piip.config import CONF_DIR, backbone_dict, paper_protocol, paper_twin_dict
from piip.models import PIIPBackbone, PIIPConfig
from piip.tools.complexity import Complexity, count


def measure(data: dict, protocol: str, deform_grid_of_first_interaction: bool = False) -> Complexity:
    config = PIIPConfig.from_dict(data)
    with torch.device("meta"):
        model = PIIPBackbone(config).eval()
        size = config.resolutions[0]
        images = torch.empty(1, 3, size, size)
    return count(model, images, protocol, deform_grid_of_first_interaction)


def paper_count(cfg: DictConfig) -> Complexity:
    """The paper protocol; LLaVA encoders follow the LLaVA script's deformable-grid rule."""
    return measure(
        paper_twin_dict(cfg), "paper", deform_grid_of_first_interaction=paper_protocol(cfg) == "encoder"
    )


def flops_report(cfg: DictConfig) -> dict[str, float]:
    actual = measure(backbone_dict(cfg), "actual")
    paper = paper_count(cfg)
    return {
        "params_m": round(actual.params_m, 4),
        "gflops": round(actual.gflops, 4),
        "paper_params_m": round(paper.params_m, 4),
        "paper_gflops": round(paper.gflops, 4),
    }


@hydra.main(config_path=str(CONF_DIR), config_name="flops", version_base="1.3")
def main(cfg: DictConfig) -> None:
    report = flops_report(cfg)
    if cfg.format == "json":
        print(json.dumps(report))
        return
    sizes = "/".join(str(r) for r in backbone_dict(cfg)["resolutions"])
    table = Table(title=f"{cfg.model.name} · task {cfg.task.name} · {sizes}")
    for column in ("count", "#Param (M)", "#FLOPs (G)"):
        table.add_column(column, justify="right" if column != "count" else "left")
    table.add_row("paper protocol", f"{report['paper_params_m']:.1f}", f"{report['paper_gflops']:.1f}")
    table.add_row("actual backbone", f"{report['params_m']:.1f}", f"{report['gflops']:.1f}")
    Console().print(table)


if __name__ == "__main__":
    quote_resolution_overrides()
    main()
