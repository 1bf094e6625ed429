"""What one DINO encoder layer keeps for backward per image, counted on fake tensors (nothing is allocated).

python benchmarks/dino_encoder_memory.py [--size 1792] [--dtype fp32|bf16]

The grid-sample path of multi-scale deformable attention samples every (query, head, level, point) and keeps
those samples for the backward of the weighted sum: tokens x heads x levels x points x head_dim values per
layer. The script prints that share beside the layer's whole saved bytes, for one image padded to
`size` x `size` (strides 8/16/32 from the backbone + 64 from the neck, 256 channels, 8 heads, 4 levels,
4 points: the official DINO configuration).
"""

from __future__ import annotations

import argparse
import math

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from piip.analysis.memory import SavedTensors, storage_keys, to_fake
from piip.models.heads.dino_transformer import EncoderLayer, encoder_reference_points

STRIDES = (8, 16, 32, 64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1792)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    args = parser.parse_args()
    dim, heads, levels, points = 256, 8, 4, 4
    shapes = [(math.ceil(args.size / s), math.ceil(args.size / s)) for s in STRIDES]
    tokens = sum(h * w for h, w in shapes)
    with torch.device("meta"):
        layer = EncoderLayer(dim, heads, levels, points, ffn_dim=2048)
    mode = FakeTensorMode()
    to_fake(layer, mode)
    counter = SavedTensors(storage_keys(layer))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    with mode, counter.counting(), autocast:
        x = torch.empty(1, tokens, dim, requires_grad=True)
        pos = torch.empty(1, tokens, dim)
        reference = encoder_reference_points(shapes, torch.ones(1, levels, 2))
        padding = torch.zeros(1, tokens, dtype=torch.bool)
        out = layer(x, pos, reference, shapes, padding)
        saved = counter.bytes
        del out
    samples = tokens * heads * levels * points * (dim // heads) * 4  # the op always samples in fp32
    print(f"image {args.size}^2, levels {shapes}: {tokens} tokens, {args.dtype}")
    print(f"saved for backward by one encoder layer: {saved / 2**30:.3f} GiB per image")
    print(f"of which sampled values (tokens x heads x levels x points x head dim): {samples / 2**30:.3f} GiB")


if __name__ == "__main__":
    main()
