"""Backbone speed and memory, side by side with a baseline: does PIIP's FLOPs saving show up as time saved?

    python -m piip.tools.benchmark model=piip_tsb task=coco resolution=1568_896_448 baseline=vit_b
    python -m piip.tools.benchmark model=piip_sbl task=coco baseline=vit_l device=cuda dtype=bf16 compile=true

For the model and the baseline (the baseline's own resolution for the task unless `baseline_resolution`
is set) it times the backbone's forward pass (`forward`, inference mode) and forward + backward of the sum
of its outputs (`train`) on random images at the highest branch resolution, and prints latency, images/s,
peak memory, GFLOPs (multiply-adds, as PAPER.md counts them) and, on GPU, the model FLOPs utilisation;
then the measured time ratio next to the FLOPs ratio. `output=FILE` also writes everything as JSON.

Each model is measured in its own spawned process, so one model's allocations and compiled kernels do not
leak into the other's figures. Peak memory is `torch.cuda.max_memory_allocated` on GPU; on CPU it is the
growth of the process's peak resident set over what it held before building the model (forward is
measured first, so the train figure includes it). Nothing here is a test: it prints what it measures.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import queue as queue_module
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from piip.app import configure_cpu_math
from piip.cli import quote_resolution_overrides
from piip.config import CONF_DIR, backbone_dict, compose
from piip.files import write_json
from piip.models import PIIPBackbone, PIIPConfig
from piip.models.config import ConfigError
from piip.tools.flops import measure, paper_count

MODES = ("forward", "train")


def _rss_mb() -> float:
    """Current resident set of this process (Linux /proc), in MiB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _output_sum(out: Any) -> torch.Tensor:
    """A scalar that depends on every output the task reads, so backward reaches the whole backbone."""
    tensors = out.pyramid or ([out.features] if out.features is not None else out.branch_maps)
    loss = sum(t.float().mean() for t in tensors)
    return loss + out.logits.float().mean() if out.logits is not None else loss


def time_backbone(backbone: dict[str, Any], settings: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Latency, throughput and peak memory of one backbone for each mode (runs in the calling process)."""
    torch.manual_seed(0)
    device = torch.device(settings["device"])
    cuda = device.type == "cuda"
    rss_before = _rss_mb()
    model = PIIPBackbone(PIIPConfig.from_dict(backbone)).to(device)
    model.set_grad_checkpointing(settings["grad_checkpointing"])  # recomputation: only `train` changes
    runner = torch.compile(model) if settings["compile"] else model
    size = backbone["resolutions"][0]
    images = torch.randn(settings["batch_size"], 3, size, size, device=device)
    bf16 = settings["dtype"] == "bf16"
    results: dict[str, dict[str, float]] = {}
    for mode in (m for m in MODES if m in settings["modes"]):
        model.train(mode == "train")
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)

        def step(mode: str = mode) -> None:
            autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
            if mode == "forward":
                with torch.inference_mode(), autocast:
                    runner(images)
            else:
                with autocast:
                    loss = _output_sum(runner(images))
                loss.backward()
                model.zero_grad(set_to_none=True)

        times = []
        for i in range(settings["warmup"] + settings["iters"]):
            if cuda:
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize(device)
            if i >= settings["warmup"]:
                times.append(time.perf_counter() - start)
        latency = statistics.median(times)
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else _peak_rss_mb() - rss_before
        results[mode] = {
            "latency_ms": latency * 1e3,
            "images_per_s": settings["batch_size"] / latency,
            "peak_memory_mb": peak,
        }
    return results


def _child(backbone: dict[str, Any], settings: dict[str, Any], queue: Any) -> None:
    try:
        configure_cpu_math()
        queue.put(("ok", time_backbone(backbone, settings)))
    except Exception as err:  # noqa: BLE001 - reported by the parent with the model's name
        queue.put(("error", f"{type(err).__name__}: {err}"))


def time_in_child(backbone: dict[str, Any], settings: dict[str, Any]) -> dict[str, dict[str, float]]:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(backbone, settings, queue))
    process.start()
    while True:  # a child killed outright (e.g. out of memory) never answers: watch it while waiting
        try:
            status, payload = queue.get(timeout=5)
            break
        except queue_module.Empty:
            if not process.is_alive():
                status, payload = "error", f"the measuring process died (exit code {process.exitcode})"
                if process.exitcode == -9:
                    payload += ", most likely killed for lack of memory: try modes=[forward] or batch_size=1"
                break
    process.join()
    if status != "ok":
        raise RuntimeError(f"benchmark of {backbone.get('name', 'model')} failed: {payload}")
    return payload


def model_entry(cfg: DictConfig, settings: dict[str, Any]) -> dict[str, Any]:
    backbone = backbone_dict(cfg)
    counted = measure(backbone, "actual")
    entry = {
        "model": cfg.model.name,
        "resolutions": list(backbone["resolutions"]),
        "params_m": counted.params_m,
        "gflops": counted.gflops,
        "paper_gflops": paper_count(cfg).gflops,  # PAPER.md's protocol, comparable with its tables
        "modes": time_in_child(backbone, settings),
    }
    if settings["device"].startswith("cuda"):
        from lightning.fabric.utilities.throughput import get_available_flops

        dtype = torch.bfloat16 if settings["dtype"] == "bf16" else torch.float32
        available = get_available_flops(torch.device(settings["device"]), dtype)
        for mode, figures in entry["modes"].items():
            passes = 3 if mode == "train" else 1  # backward costs about twice the forward
            achieved = 2 * counted.gflops * 1e9 * passes * figures["images_per_s"]
            figures["mfu"] = achieved / available if available else None
    return entry


def ratios(model: dict[str, Any], baseline: dict[str, Any]) -> dict[str, float]:
    """Model / baseline: FLOPs (as built, and by the paper's protocol), and time per image per mode."""
    out = {
        "flops": model["gflops"] / baseline["gflops"],
        "paper_flops": model["paper_gflops"] / baseline["paper_gflops"],
    }
    for mode in model["modes"]:
        if mode in baseline["modes"]:
            out[f"{mode}_time"] = model["modes"][mode]["latency_ms"] / baseline["modes"][mode]["latency_ms"]
    return out


def settings_of(cfg: DictConfig) -> dict[str, Any]:
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
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
        "batch_size": int(cfg.batch_size),
        "warmup": int(cfg.warmup),
        "iters": int(cfg.iters),
        "modes": modes,
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
    report: dict[str, Any] = {
        "task": cfg.task.name,
        "settings": settings,
        "models": [model_entry(cfg, settings)],
    }
    if cfg.get("baseline"):
        report["models"].append(model_entry(baseline_config(cfg), settings))
        report["ratios"] = ratios(*report["models"])
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
        times = ", ".join(f"{k.removesuffix('_time')} {v:.2f}" for k, v in r.items() if k.endswith("_time"))
        console.print(
            f"model / baseline: FLOPs {r['flops']:.2f} as built ({r['paper_flops']:.2f} by the paper's "
            f"protocol) · time {times}"
        )


@hydra.main(config_path=str(CONF_DIR), config_name="benchmark", version_base="1.3")
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
    main()
