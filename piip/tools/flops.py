"""Parameters (M) and FLOPs (G, multiply-accumulates) of a model for a task and resolution.

    python -m piip.tools.flops model=piip_sbl task=coco resolution=1568_896_672 [format=json]

`paper`: the paper's counting protocol (see `piip.analysis.complexity` and PAPER.md §4), comparable with the
released tables. `actual`: the backbone as instantiated for the task. Both are built on the meta device.
"""

from __future__ import annotations

import json

import hydra
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from piip.run.cli import one_line_errors, quote_resolution_overrides, run_tool
from piip.run.config import CONF_DIR, backbone_dict
from piip.run.results import flops_report

__all__ = ["flops_report", "main"]


@hydra.main(config_path=str(CONF_DIR), config_name="flops", version_base="1.3")
@one_line_errors
def main(cfg: DictConfig) -> None:
    backbone = backbone_dict(cfg)
    report = flops_report(cfg, backbone)
    if cfg.format == "json":
        print(json.dumps(report))
        return
    sizes = "/".join(str(r) for r in backbone["resolutions"])
    table = Table(title=f"{cfg.model.name} · task {cfg.task.name} · {sizes}")
    for column in ("count", "#Param (M)", "#FLOPs (G)"):
        table.add_column(column, justify="right" if column != "count" else "left")
    table.add_row("paper protocol", f"{report['paper_params_m']:.1f}", f"{report['paper_gflops']:.1f}")
    table.add_row("actual backbone", f"{report['params_m']:.1f}", f"{report['gflops']:.1f}")
    Console().print(table)


if __name__ == "__main__":
    quote_resolution_overrides()
    run_tool("flops", main)
