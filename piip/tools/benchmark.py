"""Backbone speed and memory, side by side with a baseline: does PIIP's FLOPs saving show up as time saved?

    python -m piip.tools.benchmark model=piip_tsb task=coco resolution=1568_896_448 baseline=vit_b
    python -m piip.tools.benchmark model=piip_sbl task=coco baseline=vit_l device=cuda dtype=bf16 compile=true

For the model and the baseline (the baseline's own resolution for the task unless `baseline_resolution`
is set) it times the backbone's forward pass (`forward`, inference mode) and forward + backward of the sum
of its outputs (`train`) on random images at the highest branch resolution, and prints latency, images/s,
peak memory, GFLOPs (multiply-adds, as PAPER.md counts them) and, on GPU, the model FLOPs utilisation;
then the measured time ratio next to the FLOPs ratio. `output=FILE` also writes everything as JSON.

Each model is measured in its own spawned process, so one model's allocations and compiled kernels do not
leak into the other's figures, and their steps alternate (A B, B A, ...; `interleave=false` times one after
the other): the time ratio is the median of the step-by-step ratios, printed with their range. Peak
memory is `torch.cuda.max_memory_allocated` on GPU; on CPU it is the growth of the process's peak resident
set over what it held before building the model (forward is measured first, so the train figure includes
it). Nothing here is a test: it prints what it measures.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from piip.analysis.benchmark import MODES, model_entry, ratios
from piip.analysis.side_by_side import time_models
from piip.data.files import write_json
from piip.errors import ConfigError
from piip.models.checks import whole_number
from piip.run.cli import one_line_errors, quote_resolution_overrides, run_tool
from piip.run.config import CONF_DIR, backbone_dict, compose
from piip.run.results import paper_complexity


def settings_of(cfg: DictConfig) -> dict[str, Any]:
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device.split(":")[0] not in ("cpu", "cuda"):
        raise ConfigError(f"device: expected auto, cpu or cuda[:N], got {cfg.device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device=cuda: no CUDA device is visible here; use device=cpu or device=auto")
    if cfg.dtype not in ("fp32", "bf16"):
        raise ConfigError(f"dtype: expected fp32 or bf16, got {cfg.dtype!r}")
    modes = list(cfg.modes)
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise ConfigError(f"modes: unknown {unknown}; expected some of {list(MODES)}")
    return {
        "device": device,
        "dtype": cfg.dtype,
        "compile": bool(cfg.compile),
        "grad_checkpointing": bool(cfg.grad_checkpointing),
        "batch_size": whole_number(cfg.batch_size, "batch_size"),
        "warmup": whole_number(cfg.warmup, "warmup", minimum=0),
        "iters": whole_number(cfg.iters, "iters"),
        "modes": modes,
        "interleave": bool(cfg.interleave),
        "threads": torch.get_num_threads(),
    }


def baseline_config(cfg: DictConfig) -> DictConfig:
    overrides = [f"model={cfg.baseline}", f"task={cfg.task.name}"]
    if cfg.get("baseline_resolution"):
        overrides.append(f"resolution='{cfg.baseline_resolution}'")
    if GlobalHydra.instance().is_initialized():  # inside hydra.main: compose with the running Hydra
        return hydra.compose(config_name="benchmark", overrides=overrides)
    return compose("benchmark", overrides)


def run(cfg: DictConfig) -> dict[str, Any]:
    settings = settings_of(cfg)
    configs = [cfg, baseline_config(cfg)] if cfg.get("baseline") else [cfg]
    backbones = [backbone_dict(c) for c in configs]
    figures, times = time_models(backbones, settings)
    models = [
        model_entry(c.model.name, backbone, paper_complexity(c, backbone).gflops, modes, settings)
        for c, backbone, modes in zip(configs, backbones, figures, strict=True)
    ]
    report: dict[str, Any] = {"task": cfg.task.name, "settings": settings, "models": models}
    if len(models) == 2:
        report["ratios"] = ratios(*models, times)
    return report


def print_table(report: dict[str, Any]) -> None:
    settings = report["settings"]
    title = (
        f"task {report['task']} · {settings['device']} · {settings['dtype']} · "
        f"{'compiled' if settings['compile'] else 'eager'} · batch {settings['batch_size']}"
        f"{' · activation checkpointing' if settings['grad_checkpointing'] else ''}"
    )
    table = Table(title=title)
    columns = [
        "model",
        "resolution",
        "GFLOPs",
        "params (M)",
        "mode",
        "latency (ms)",
        "images/s",
        "peak (MiB)",
    ]
    gpu = any("mfu" in f for m in report["models"] for f in m["modes"].values())
    for column in [*columns, "MFU"] if gpu else columns:
        table.add_column(column, justify="left" if column in ("model", "mode", "resolution") else "right")
    for model in report["models"]:
        for mode, figures in model["modes"].items():
            row = [
                model["model"],
                "/".join(map(str, model["resolutions"])),
                f"{model['gflops']:.4g}",
                f"{model['params_m']:.4g}",
                mode,
                f"{figures['latency_ms']:.1f}",
                f"{figures['images_per_s']:.2f}",
                f"{figures['peak_memory_mb']:.0f}",
            ]
            if gpu:
                row.append(f"{figures['mfu']:.1%}" if figures.get("mfu") is not None else "-")
            table.add_row(*row)
    console = Console()
    if not console.is_terminal:  # redirected to a file or a log: do not squeeze the table to 80 columns
        console = Console(width=160)
    console.print(table)
    if "ratios" in report:
        r = report["ratios"]
        pairs = "interleaved pairs" if report["settings"]["interleave"] else "steps"
        times = ", ".join(
            f"{k.removesuffix('_time')} {v:.2f} ({r[k + '_range'][0]:.2f}-{r[k + '_range'][1]:.2f} over "
            f"{report['settings']['iters']} {pairs})"
            for k, v in r.items()
            if k.endswith("_time")
        )
        console.print(
            f"model / baseline: FLOPs {r['flops']:.2f} as built ({r['paper_flops']:.2f} by the paper's "
            f"protocol) · time {times}"
        )


@hydra.main(config_path=str(CONF_DIR), config_name="benchmark", version_base="1.3")
@one_line_errors
def main(cfg: DictConfig) -> None:
    report = run(cfg)
    if cfg.output:
        write_json(Path(cfg.output), report)
    if cfg.format == "json":
        print(json.dumps(report))
    else:
        print_table(report)


if __name__ == "__main__":
    quote_resolution_overrides()
    run_tool("benchmark", main)
