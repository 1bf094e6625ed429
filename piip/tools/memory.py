"""GPU memory per device for training a model on a task, estimated on the CPU without allocating anything.

    python -m piip.tools.memory model=piip_tsb task=coco resolution=1568_896_448
    python -m piip.tools.memory experiment=coco_piip_h6b_1024_512 grad_checkpointing=null format=markdown
    python -m piip.tools.memory model=piip_tiny task=coco dtype=fp32 validate=true

The model is built from the composed config as `train.py` builds it, on the meta device; the accounting and
its assumptions (state per parameter under DDP/FSDP, activations counted on fake tensors, what is left out)
are in `piip.analysis.memory`. `validate=true` (small models only) also measures one real CPU step.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from piip.analysis.memory import (
    activation_figures,
    head_scope,
    measure_real,
    parameter_counts,
    state_figures,
    to_fake,
    totals,
)
from piip.data.files import write_json
from piip.errors import ConfigError
from piip.models import PIIPBackbone, PIIPConfig
from piip.models.checks import whole_number
from piip.run.build import build_task, configure_cpu_math
from piip.run.cli import one_line_errors, quote_resolution_overrides, run_tool
from piip.run.config import CONF_DIR, backbone_dict

GIB = 2**30
KINDS_WITH_HEADS = ("detection", "segmentation", "classification")
DTYPES = ("bf16", "fp32")
MAX_VALIDATE_PARAMS = 500e6


# -- building ---------------------------------------------------------------------------------------------
def task_kind(cfg: DictConfig) -> str:
    return str((cfg.get("task") or {}).get("kind", "detection"))


def build_model(cfg: DictConfig, backbone: dict[str, Any], device: str = "meta") -> nn.Module:
    """The training model as `train.py` builds it (task heads included where the kind has them).

    Without its EMA copy: timm's `ModelEmaV3` cannot be built on meta; `parameter_counts` adds it back.
    """
    with torch.device(device):
        if task_kind(cfg) not in KINDS_WITH_HEADS or "module" not in cfg.task:
            return PIIPBackbone(PIIPConfig.from_dict(backbone))
        # only what the task reads: the trainer section would need Hydra's runtime to resolve
        keys = [k for k in ("task", "model", "paths", "seed", "resolution") if k in cfg]
        slim = OmegaConf.masked_copy(cfg, keys)
        if "optim" in slim.task:
            slim.task.optim.ema_decay = None
        return build_task(slim, backbone, load_pretrained=False)


def keeps_ema(cfg: DictConfig) -> bool:
    return bool(((cfg.get("task") or {}).get("optim") or {}).get("ema_decay"))


def training_input(cfg: DictConfig, resolutions: list[int], batch_size: int) -> tuple[int, int]:
    """(H, W) of the largest batch tensor the backbone sees in training: memory has to fit the worst case."""
    requested = cfg.get("image_size")
    if requested is not None:
        sizes = [int(requested)] * 2 if isinstance(requested, int) else [int(v) for v in requested]
        if len(sizes) != 2 or min(sizes) <= 0:
            raise ConfigError(f"image_size: expected [H, W] or one side in pixels, got {requested}")
        return sizes[0], sizes[1]
    top = int(resolutions[0])
    if task_kind(cfg) != "detection" or "data" not in cfg.task:
        return top, top  # segmentation crops and classification inputs are square at the top resolution
    data = cfg.task.data
    scales = data.get("train_scales") or [data.get("scale") or [top, top * 800 // 1333]]
    long, short = max(int(s[0]) for s in scales), max(int(s[1]) for s in scales)
    if data.get("crop"):
        long, short = min(long, int(data.crop)), min(short, int(data.crop))
    divisor = int(((cfg.task.get("module") or {}).get("detector") or {}).get("size_divisible", 32))

    def pad(side: int) -> int:
        return -(-side // divisor) * divisor

    # the batch pads every image to the largest height and width in it; no aspect-ratio grouping, so a
    # batch of a landscape and a portrait image is long x long
    return (pad(long), pad(long)) if batch_size > 1 else (pad(short), pad(long))


# -- report -----------------------------------------------------------------------------------------------
def settings_of(cfg: DictConfig) -> dict[str, Any]:
    if cfg.dtype not in DTYPES:
        raise ConfigError(f"dtype: expected one of {list(DTYPES)}, got {cfg.dtype!r}")
    devices = whole_number(cfg.devices, "devices", minimum=0)
    if devices < 1:
        raise ConfigError(f"devices: expected a positive number of GPUs, got {cfg.devices}")
    batch = cfg.batch_size
    if batch is None:
        batch = ((cfg.task.get("data") or {}).get("batch_size")) or 1
    batch = whole_number(batch, "batch_size", minimum=0)
    if batch < 1:
        raise ConfigError(f"batch_size: expected at least 1 image per GPU, got {batch}")
    return {"batch_size": batch, "devices": devices, "dtype": cfg.dtype}


def estimate(cfg: DictConfig) -> dict[str, Any]:
    """Everything the table prints, as plain data (bytes unless named otherwise)."""
    settings = settings_of(cfg)
    backbone = backbone_dict(cfg)
    kind = task_kind(cfg)
    start = time.perf_counter()
    model = build_model(cfg, backbone).train()
    params = parameter_counts(model, keeps_ema(cfg))
    if cfg.get("validate") and params["total"] > MAX_VALIDATE_PARAMS:
        raise ConfigError(
            f"validate=true builds {cfg.model.name} ({params['total'] / 1e6:.0f}M parameters) for real on "
            f"the CPU; it is meant for small models (at most {MAX_VALIDATE_PARAMS / 1e6:.0f}M)"
        )
    built = time.perf_counter() - start
    size = training_input(cfg, backbone["resolutions"], settings["batch_size"])
    bf16 = settings["dtype"] == "bf16"
    mode = FakeTensorMode()
    to_fake(model, mode)
    with mode:
        acts = activation_figures(model, size, bf16)
    state = state_figures(params, settings["devices"], bf16)
    checkpointing = cfg.get("grad_checkpointing")
    report = {
        "model": cfg.model.name,
        "task": cfg.task.name,
        "kind": kind,
        "resolutions": list(backbone["resolutions"]),
        "input_size": list(size),
        "heads": head_scope(model),
        "settings": settings,
        "params": params,
        "state": state,
        "activations": acts,
        "totals": totals(state, acts, settings["batch_size"], 2 * params["autocast"] if bf16 else 0),
        "seconds": {"build": built, "total": time.perf_counter() - start},
    }
    if checkpointing is not None:  # only the asked setting (an experiment's grad_checkpointing, say)
        report["totals"].pop("plain" if checkpointing else "checkpointing")
    if cfg.get("validate"):
        report["measured"] = measure_real(
            lambda: build_model(cfg, backbone, "cpu"), size, settings["batch_size"], bf16
        )
    return report


def _gib(value: float) -> str:
    return f"{value / GIB:.1f}"


def _size(value: float) -> str:
    """GiB, or MiB below one GiB (small models would read 0.0)."""
    return f"{value / GIB:.1f} GiB" if value >= GIB else f"{value / 2**20:.0f} MiB"


def caption(report: dict[str, Any]) -> str:
    s = report["settings"]
    height, width = report["input_size"]
    return (
        f"{report['model']} · task {report['task']} · {s['dtype']} training, AdamW · "
        f"{s['batch_size']} image(s) per GPU at {height}x{width} · FSDP over {s['devices']} GPUs · "
        f"estimated on fake tensors ({report['heads']}) · per GPU, without CUDA context/fragmentation"
    )


def print_table(report: dict[str, Any]) -> None:
    table = Table(title=caption(report))
    columns = [
        "checkpointing",
        "params (M)",
        "trainable (M)",
        "state DDP",
        "state FSDP",
        "act./image",
        "total DDP",
        "total FSDP",
    ]
    for column in columns:
        table.add_column(column, justify="left" if column == "checkpointing" else "right")
    params, state = report["params"], report["state"]
    for name, figures in report["totals"].items():
        table.add_row(
            "on" if name == "checkpointing" else "off",
            f"{params['total'] / 1e6:.1f}",
            f"{params['trainable'] / 1e6:.1f}",
            _size(state["ddp"]),
            _size(state["fsdp"]),
            _size(figures["activations_per_image"]),
            _size(figures["ddp"]),
            _size(figures["fsdp"]),
        )
    console = Console()
    if not console.is_terminal:  # redirected to a file or a log: do not squeeze the table to 80 columns
        console = Console(width=160)
    console.print(table)
    for name, m in report.get("measured", {}).items():
        setting = "on" if name == "checkpointing" else "off"
        console.print(
            f"measured with real tensors on the CPU, checkpointing {setting}: saved for backward "
            f"{m['saved'] / 2**20:.1f} MiB, peak of live tensors in forward + backward "
            f"{m['peak_forward_backward'] / 2**20:.1f} MiB (gradients {m['gradients'] / 2**20:.1f} MiB)"
        )


MARKDOWN_HEADER = (
    "| model | resolutions | input (per GPU) | params (M) | act./image | DDP | FSDP "
    "| act./image (GC) | DDP (GC) | FSDP (GC) |\n|---|---|---|---:|---:|---:|---:|---:|---:|---:|"
)


def markdown_row(report: dict[str, Any]) -> str:
    t = report["totals"]
    cells = [
        report["model"],
        "/".join(map(str, report["resolutions"])),
        f"{report['settings']['batch_size']} x {report['input_size'][0]}x{report['input_size'][1]}",
        f"{report['params']['total'] / 1e6:.0f}",
    ]
    for name in ("plain", "checkpointing"):
        figures = t.get(name)
        cells += (
            [_gib(figures[k]) for k in ("activations_per_image", "ddp", "fsdp")] if figures else ["-"] * 3
        )
    return "| " + " | ".join(cells) + " |"


@hydra.main(config_path=str(CONF_DIR), config_name="memory", version_base="1.3")
@one_line_errors
def main(cfg: DictConfig) -> None:
    configure_cpu_math()  # validate=true runs real CPU steps: no subnormal slowdown
    report = estimate(cfg)
    if cfg.output:
        write_json(Path(cfg.output), report)
    if cfg.format == "json":
        print(json.dumps(report))
    elif cfg.format == "markdown":
        print(MARKDOWN_HEADER)
        print(markdown_row(report))
    else:
        print_table(report)


if __name__ == "__main__":
    quote_resolution_overrides()
    run_tool("memory", main)
