"""Forward + backward time of `piip_tiny` on CPU (prints figures; nothing is asserted).

python benchmarks/tiny_step.py [--task coco] [--batch 2] [--steps 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from piip.models import PIIPBackbone
from piip.run.presets import model_config


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--task", default="coco")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = model_config("piip_tiny", task=args.task)
    model = PIIPBackbone(config)
    size = config.resolutions[0]
    images = torch.randn(args.batch, 3, size, size)
    times = []
    for step in range(args.steps + 3):
        start = time.perf_counter()
        out = model(images)
        loss = sum(level.float().mean() for level in out.pyramid) if out.pyramid else out.logits.mean()
        loss.backward()
        if step >= 3:  # warm-up
            times.append(time.perf_counter() - start)
    params = sum(p.numel() for p in model.parameters())
    print(
        f"piip_tiny task={args.task} input {args.batch}x3x{size}x{size}, {params / 1e6:.2f} M params, "
        f"{torch.get_num_threads()} threads"
    )
    print(
        f"forward+backward: median {1000 * statistics.median(times):.1f} ms, "
        f"min {1000 * min(times):.1f} ms over {args.steps} steps"
    )


if __name__ == "__main__":
    main()
