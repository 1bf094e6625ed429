"""Timing a backbone: latency, images/s and peak memory of its forward and forward + backward passes, each
model in a spawned process of its own (its allocations and compiled kernels do not leak into the next
model's figures). `python -m piip.tools.benchmark` composes the models and prints the comparison."""

from __future__ import annotations

import contextlib
import multiprocessing
import queue as queue_module
import resource
import statistics
import time
from typing import Any

import torch

from piip.analysis.flops import measure
from piip.models.backbone.backbone import PIIPBackbone
from piip.models.backbone.config import PIIPConfig
from piip.models.numerics import configure_cpu_math

MODES = ("forward", "train")


def _rss_mb() -> float:
    """Current resident set of this process (Linux /proc), in MiB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def backward_from_outputs(out: Any, gradients: dict[tuple, torch.Tensor]) -> None:
    """Backward from every output the task reads, with a dense gradient of ones laid out like each output
    (the gradient of their sum), as a head hands it back. A scalar loss such as their mean would hand each
    output a broadcast scalar instead, which the first convolution's backward copies into a dense map
    (0.8 s of a PIIP-TSB 1568 step on CPU) and no real head produces. `gradients` keeps them from step to
    step: filling fresh 0.5 GB maps is no part of the model's time."""
    tensors = list(out.pyramid or ([out.features] if out.features is not None else out.branch_maps))
    if out.logits is not None:
        tensors.append(out.logits)
    grads = []
    for t in tensors:
        key = (t.shape, t.stride(), t.dtype, t.device)
        if key not in gradients:  # not setdefault: its default would fill a new map on every step
            gradients[key] = torch.ones_like(t)
        grads.append(gradients[key])
    torch.autograd.backward(tensors, grads)


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
    gradients: dict[tuple, torch.Tensor] = {}
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
                    out = runner(images)
                backward_from_outputs(out, gradients)
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


def model_entry(
    name: str, backbone: dict[str, Any], paper_gflops: float, settings: dict[str, Any]
) -> dict[str, Any]:
    """One model's figures: counts (as built; `paper_gflops` by PAPER.md's protocol) and timings per mode."""
    counted = measure(backbone, "actual")
    entry = {
        "model": name,
        "resolutions": list(backbone["resolutions"]),
        "params_m": counted.params_m,
        "gflops": counted.gflops,
        "paper_gflops": paper_gflops,  # comparable with the paper's tables
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
