"""Where a backbone's CPU time goes: the torch profiler's top operators for one forward (inference mode) or
one forward + backward, with the time and call count of the copies (`aten::copy_`) called out.

python benchmarks/profile_backbone.py [--model piip_tsb] [--task coco] [--resolution 1568_896_448]
    [--mode forward|train] [--checkpointing] [--rows 15]

Prints figures only; what counts as overhead (copies, casts, layout changes) is read off the table.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from piip.analysis.benchmark import backward_from_outputs
from piip.models import PIIPBackbone
from piip.models.numerics import configure_cpu_math
from piip.run.presets import model_config


def step(model: PIIPBackbone, images: torch.Tensor, mode: str, gradients: dict) -> None:
    if mode == "forward":
        with torch.inference_mode():
            model(images)
        return
    backward_from_outputs(model(images), gradients)
    model.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="piip_tsb")
    parser.add_argument("--task", default="coco")
    parser.add_argument("--resolution", default="1568_896_448")
    parser.add_argument("--mode", choices=("forward", "train"), default="forward")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing (train)")
    parser.add_argument("--rows", type=int, default=15)
    args = parser.parse_args()
    configure_cpu_math()
    torch.manual_seed(0)
    model = PIIPBackbone(model_config(args.model, task=args.task, resolution=args.resolution))
    model.set_grad_checkpointing(args.checkpointing)
    model.train(args.mode == "train")
    size = model.config.resolutions[0]
    images = torch.randn(1, 3, size, size)
    gradients: dict = {}
    step(model, images, args.mode, gradients)  # warm-up: first-call allocations and dispatch caches
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(model, images, args.mode, gradients)
    wall = time.perf_counter() - start
    averages = prof.key_averages()
    total_us = sum(e.self_cpu_time_total for e in averages)
    copies = [e for e in averages if e.key == "aten::copy_"]
    print(
        f"{args.model} {args.resolution} task={args.task} {args.mode}"
        f"{' + checkpointing' if args.checkpointing else ''}, {torch.get_num_threads()} threads: "
        f"{wall * 1e3:.0f} ms profiled ({total_us / 1e3:.0f} ms self time in operators)"
    )
    for e in copies:
        print(f"aten::copy_: {e.count} calls, {e.self_cpu_time_total / 1e3:.0f} ms self time")
    print(averages.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=40))


if __name__ == "__main__":
    main()
