"""Write tests/fixtures/official/beit_uniperceiver_branches.pt: outputs of upstream's BEiT and Uni-Perceiver.

    python benchmarks/official/beit_uniperceiver_branches.py /path/to/PIIP \
        tests/fixtures/official/beit_uniperceiver_branches.pt

Why: piip runs these two upstream classes (`mmdet/models/backbones/beit.py` `BEiT`,
`uniperceiver.py` `UnifiedBertEncoder`) as timm models; the test loads each fixture's state dict through the
branch's `from_official` and compares the tokens after all blocks with upstream's. Each tiny model has one
windowed block whose window does not divide the grid (padding) and one global block, random weights
(layer scale and relative-position tables included) and a random uint8 image (`to_input`). Upstream's files
are imported with the stand-ins of `official_imports.py`; nothing is copied.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import official_imports  # noqa: E402

DIM, HEADS, DEPTH = 16, 2, 2
# BEiT: 96x96 input = the pretrained grid (6x6), so the global block's table (upstream sizes it by its
# `window_size`, 6) fits; Uni-Perceiver: 64-pixel pretraining (4x4 pos-embed) and a 96x80 input (6x5 grid).
BEIT = dict(
    pretrain_img_size=96,
    embed_dim=DIM,
    depth=DEPTH,
    num_heads=HEADS,
    qkv_bias=True,
    init_values=1e-6,
    window_attn=[True, False],
    window_size=[4, 6],
    pretrained=None,
)
UNIPERCEIVER = dict(
    pretrain_img_size=64,
    embed_dim=DIM,
    depth=DEPTH,
    num_heads=HEADS,
    window_attn=[True, False],
    window_size=[4, 4],
    pretrained=None,
)


def _import(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _randomise(model: nn.Module, generator: torch.Generator) -> None:
    """Every parameter away from its init (norm weights near 1), so each one matters to the output."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            is_norm = "norm" in name and name.endswith("weight")
            param.copy_(1 + 0.1 * noise if is_norm else 0.3 * noise)


def to_input(image: torch.Tensor) -> torch.Tensor:
    """uint8 image (stored: 4x smaller than floats) -> the model input, mean = std = 127.5 as in detection."""
    return image.float() / 127.5 - 1.0


def _run_blocks(embed: nn.Module, blocks: nn.ModuleList, image: torch.Tensor) -> torch.Tensor:
    x, height, width = embed(image)
    for block in blocks:
        x = block(x, height, width)
    return x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("official", type=Path, help="root of an official PIIP checkout")
    parser.add_argument("out", type=Path, help="fixture file to write")
    args = parser.parse_args()
    official_imports.install_stubs()
    folder = args.official / "mmdetection/mmdet/models/backbones"
    beit = _import(folder / "beit.py", "official_beit").BEiT(**BEIT).eval()
    uniperceiver = _import(folder / "uniperceiver.py", "official_uniperceiver")
    unified = uniperceiver.UnifiedBertEncoder(**UNIPERCEIVER).eval()
    generator = torch.Generator().manual_seed(0)
    fixture = {}
    with torch.no_grad():
        _randomise(beit, generator)
        image = torch.randint(0, 256, (1, 3, 96, 96), dtype=torch.uint8, generator=generator)
        out = _run_blocks(beit.patch_embed, beit.blocks, to_input(image))
        fixture["beit"] = {"config": BEIT, "state_dict": beit.state_dict(), "image": image, "tokens": out}
        _randomise(unified, generator)
        image = torch.randint(0, 256, (1, 3, 96, 80), dtype=torch.uint8, generator=generator)
        out = _run_blocks(unified.visual_embed, unified.layers, to_input(image))
        fixture["uniperceiver"] = {
            "config": UNIPERCEIVER,
            "state_dict": unified.state_dict(),
            "image": image,
            "tokens": out,
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(fixture, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
