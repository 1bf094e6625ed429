"""Timing a backbone: latency and peak memory of its forward pass and of forward + backward, one step at a
time, so that `piip.analysis.side_by_side` can alternate the steps of two models held in two processes.
`python -m piip.tools.benchmark` composes the models and prints the comparison."""

from __future__ import annotations

import contextlib
import resource
import statistics
import time
from typing import Any

import torch

from piip.analysis.flops import measure
from piip.models.backbone.backbone import PIIPBackbone
from piip.models.backbone.config import PIIPConfig

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


class BackboneTimer:
    """One backbone on random images at its highest branch resolution, timed one step at a time.

    Peak memory is `torch.cuda.max_memory_allocated` since `start(mode)` on GPU; on CPU it is the growth of
    the process's peak resident set over what it held before building the model (modes run in order, so the
    train figure includes the forward's)."""

    def __init__(self, backbone: dict[str, Any], settings: dict[str, Any]) -> None:
        torch.manual_seed(0)
        self.device = torch.device(settings["device"])
        self.cuda = self.device.type == "cuda"
        self.rss_before = _rss_mb()
        self.model = PIIPBackbone(PIIPConfig.from_dict(backbone)).to(self.device)
        self.model.set_grad_checkpointing(settings["grad_checkpointing"])  # recomputation: `train` only
        self.runner = torch.compile(self.model) if settings["compile"] else self.model
        size = backbone["resolutions"][0]
        self.images = torch.randn(settings["batch_size"], 3, size, size, device=self.device)
        self.bf16 = settings["dtype"] == "bf16"
        self.gradients: dict[tuple, torch.Tensor] = {}

    def start(self, mode: str) -> None:
        self.model.train(mode == "train")
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def _run(self, mode: str) -> None:
        autocast = (
            torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        )
        if mode == "forward":
            with torch.inference_mode(), autocast:
                self.runner(self.images)
            return
        with autocast:
            out = self.runner(self.images)
        backward_from_outputs(out, self.gradients)
        self.model.zero_grad(set_to_none=True)

    def step(self, mode: str) -> float:
        """Seconds of one step of `mode`, the device synchronised on both sides."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        self._run(mode)
        if self.cuda:
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start

    def peak_mb(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return _peak_rss_mb() - self.rss_before


def mode_figures(times: list[float], peak_mb: float, batch_size: int) -> dict[str, float]:
    latency = statistics.median(times)
    return {
        "latency_ms": latency * 1e3,
        "images_per_s": batch_size / latency,
        "peak_memory_mb": peak_mb,
        "steps_ms": [t * 1e3 for t in times],  # every timed step, in the order they ran
    }


def model_entry(
    name: str,
    backbone: dict[str, Any],
    paper_gflops: float,
    modes: dict[str, dict[str, float]],
    settings: dict[str, Any],
) -> dict[str, Any]:
    """One model's figures: counts (as built; `paper_gflops` by PAPER.md's protocol) and timings per mode."""
    counted = measure(backbone, "actual")
    entry = {
        "model": name,
        "resolutions": list(backbone["resolutions"]),
        "params_m": counted.params_m,
        "gflops": counted.gflops,
        "paper_gflops": paper_gflops,  # comparable with the paper's tables
        "modes": modes,
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


def paired_ratios(model_times: list[float], baseline_times: list[float]) -> dict[str, float]:
    """Median, lowest and highest of the step-by-step time ratios. With interleaved steps each pair ran
    back to back, so a slow spell of the machine (±10 % between runs on a shared 2-core VM) hits both."""
    pairs = sorted(m / b for m, b in zip(model_times, baseline_times, strict=True))
    return {"median": statistics.median(pairs), "low": pairs[0], "high": pairs[-1]}


def ratios(model: dict[str, Any], baseline: dict[str, Any], times: dict[str, list[list[float]]]) -> dict:
    """Model / baseline: FLOPs (as built, and by the paper's protocol), and time per mode (the median of
    the paired step ratios, with their range under `{mode}_time_range`)."""
    out: dict[str, Any] = {
        "flops": model["gflops"] / baseline["gflops"],
        "paper_flops": model["paper_gflops"] / baseline["paper_gflops"],
    }
    for mode, (model_times, baseline_times) in times.items():
        paired = paired_ratios(model_times, baseline_times)
        out[f"{mode}_time"] = paired["median"]
        out[f"{mode}_time_range"] = [paired["low"], paired["high"]]
    return out
