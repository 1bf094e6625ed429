"""Where `torch.compile` splits a backbone's forward: graphs, graph breaks and each break's reason and place.

python benchmarks/compile_graph_breaks.py [--model piip_tiny] [--task coco] [--resolution R] [--train]

Runs `torch._dynamo.explain` (tracing only; nothing is compiled) and prints figures; the compiled speed is
measured by `python -m piip.tools.benchmark ... compile=true`.
"""

from __future__ import annotations

import argparse

import torch

from piip.models import PIIPBackbone
from piip.run.presets import model_config


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="piip_tiny")
    parser.add_argument("--task", default="coco")
    parser.add_argument("--resolution", default=None)
    parser.add_argument("--train", action="store_true", help="training mode with activation checkpointing")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = PIIPBackbone(model_config(args.model, task=args.task, resolution=args.resolution))
    model.train(args.train)
    model.set_grad_checkpointing(args.train)
    size = model.config.resolutions[0]
    images = torch.randn(1, 3, size, size)
    with torch.set_grad_enabled(args.train):
        explanation = torch._dynamo.explain(model)(images)
    print(
        f"{args.model} task={args.task} {'/'.join(map(str, model.config.resolutions))} "
        f"{'train + checkpointing' if args.train else 'eval'}: {explanation.graph_count} graph(s), "
        f"{explanation.graph_break_count} graph break(s), {explanation.op_count} ops"
    )
    for i, brk in enumerate(explanation.break_reasons, 1):
        frames = [f"{f.filename.split('/piip/')[-1]}:{f.lineno} {f.name}" for f in brk.user_stack[-3:]]
        print(f"break {i}: {brk.reason.splitlines()[0][:200]}")
        for frame in frames:
            print(f"    at {frame}")


if __name__ == "__main__":
    main()
