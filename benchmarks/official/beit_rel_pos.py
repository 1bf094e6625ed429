"""Write tests/fixtures/official/beit_rel_pos.pt: BEiT relative-position tables, upstream-resampled.

    python benchmarks/official/beit_rel_pos.py /path/to/PIIP tests/fixtures/official/beit_rel_pos.pt

Why: upstream resamples each pretrained (27x27 + 3) table to the window its detector uses with BEiT's own
method (a geometric-progression grid and scipy's cubic `interp2d`), inside `load_checkpoint` of
`mmdetection/mmcv_custom/checkpoint.py`. This script runs that very function on a random table, so the test
compares piip's resampling with upstream's code, not with a second reading of it. Nothing is copied: the
function's source is read from the official checkout at run time and given stand-ins for the mmcv helpers
it calls (file reading, rank, the final `load_state_dict`).

Needs scipy < 1.14, the last versions with `interp2d` (e.g. `pip install --target DIR scipy==1.13.1
numpy==2.2.6` and `PYTHONPATH=DIR`); piip itself does not.
"""

from __future__ import annotations

import argparse
import ast
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from scipy import interpolate

PRETRAIN_WINDOW = 14  # BEiTv2 at 224 with 16-pixel patches
WINDOWS = (28, 12)  # the detection configs' window, and one below the pretrained size
HEADS = 2


def official_load_checkpoint(official: Path):
    """Upstream's `load_checkpoint`, compiled from its source with stand-ins for what it imports."""
    source_file = official / "mmdetection/mmcv_custom/checkpoint.py"
    tree = ast.parse(source_file.read_text())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "load_checkpoint")
    captured: dict[str, dict[str, torch.Tensor]] = {}
    namespace = {
        "np": np,
        "torch": torch,
        "math": math,
        "interpolate": interpolate,
        "_load_checkpoint": lambda filename, map_location: {"state_dict": dict(filename)},
        "get_dist_info": lambda: (1, 1),  # not rank 0: no progress prints
        "load_state_dict": lambda model, state_dict, strict, logger: captured.update(out=state_dict),
    }
    exec(compile(ast.Module(body=[node], type_ignores=[]), str(source_file), "exec"), namespace)
    return namespace["load_checkpoint"], captured


def resample(official: Path, table: torch.Tensor, window: int) -> torch.Tensor:
    """The table upstream's loader stores into a BEiT block whose window is `window`."""
    load_checkpoint, captured = official_load_checkpoint(official)
    key = "blocks.0.attn.relative_position_bias_table"
    target = torch.zeros((2 * window - 1) ** 2, table.shape[1])
    model = SimpleNamespace(
        state_dict=lambda: {key: target},
        patch_embed=SimpleNamespace(patch_shape=(window, window)),
        get_num_layers=lambda: 1,
    )
    load_checkpoint(model, {key: table.clone()})
    return captured["out"][key]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("official", type=Path, help="root of an official PIIP checkout")
    parser.add_argument("out", type=Path, help="fixture file to write")
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    table = torch.randn((2 * PRETRAIN_WINDOW - 1) ** 2 + 3, HEADS, generator=generator)
    fixture = {"table": table, "resampled": {w: resample(args.official, table, w) for w in WINDOWS}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(fixture, args.out)
    print(f"wrote {args.out}: windows {list(WINDOWS)}, {HEADS} heads")


if __name__ == "__main__":
    main()
