"""Multi-scale deformable sampling, torch (grid-sample) against the Triton kernel: time and peak memory.

python benchmarks/deformable_backends.py [--case dino_1792|piip_interaction] [--dtype fp32|bf16] [--steps 20]

Prints, per backend, forward and forward+backward milliseconds (median of `--steps`) and the peak memory
of one forward+backward, at the shapes of one DINO encoder layer on a 1792^2 image (66,640 queries, 8 heads,
4 levels, 4 points, head dim 32) or of one PIIP-SBL interaction at 1568 (queries of the 98x98 grid reading
a 70x70 map with 16 heads, 4 points, head dim 32). Needs CUDA for Triton; on CPU only the torch row runs.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from piip.models.backbone.deformable import multi_scale_deformable_sample

CASES = {  # (queries, heads, level shapes, points, head dim)
    "dino_1792": (66640, 8, [(224, 224), (112, 112), (56, 56), (28, 28)], 4, 32),
    "piip_interaction": (98 * 98, 16, [(70, 70)], 4, 32),
}


def inputs(case: str, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
    queries, heads, shapes, points, dim = CASES[case]
    tokens = sum(h * w for h, w in shapes)
    g = torch.Generator(device="cpu").manual_seed(0)
    value = torch.randn(1, tokens, heads, dim, generator=g).to(device, dtype).requires_grad_()
    locations = (torch.rand(1, queries, heads, len(shapes), points, 2, generator=g) * 1.2 - 0.1).to(device)
    weights = torch.rand(1, queries, heads, len(shapes), points, generator=g).to(device)
    return value, locations.requires_grad_(), weights.requires_grad_()


def timed(fn: Callable[[], None], steps: int, device: torch.device) -> float:
    times = []
    for step in range(steps + 3):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= 3:
            times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=sorted(CASES), default="dino_1792")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    backends: dict[str, Callable[..., torch.Tensor]] = {"torch": multi_scale_deformable_sample}
    if device.type == "cuda":
        from piip.models.backbone.deformable_triton import multi_scale_deformable_sample_triton

        backends["triton"] = multi_scale_deformable_sample_triton
    _, _, shapes, _, _ = CASES[args.case]
    print(f"{args.case}, {args.dtype}, {device}")
    for name, op in backends.items():
        tensors = inputs(args.case, dtype, device)

        def forward(op: Callable[..., torch.Tensor] = op, tensors: tuple = tensors) -> None:
            with torch.no_grad():
                op(tensors[0], shapes, *tensors[1:])

        def both(op: Callable[..., torch.Tensor] = op, tensors: tuple = tensors) -> None:
            op(tensors[0], shapes, *tensors[1:]).float().sum().backward()

        fwd, fwd_bwd = timed(forward, args.steps, device), timed(both, args.steps, device)
        peak = "n/a"
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            both()
            peak = f"{(torch.cuda.max_memory_allocated() - base) / 2**30:.3f} GiB"
        print(f"{name:>6}: forward {fwd:8.2f} ms | forward+backward {fwd_bwd:8.2f} ms | peak {peak}")


if __name__ == "__main__":
    main()
