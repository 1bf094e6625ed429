"""Turn a sharded FSDP checkpoint folder into one file: `python -m piip.tools.consolidate CKPT [--out FILE]`.

    python -m piip.tools.consolidate outputs/coco/piip_h6b_1024_512/checkpoints/best.ckpt
    # -> outputs/coco/piip_h6b_1024_512/checkpoints/best.consolidated.ckpt

`trainer=fsdp` saves every checkpoint as a folder of per-rank shards. The single file this writes holds the
full weights and everything else Lightning saved (run config, epoch, step), without the optimizer state:
it is for `evaluate.py`, `init_from=`, `piip.tools.predict` and sharing. To resume an FSDP run, point
`ckpt_path` at the folder itself. Runs on one CPU process; memory needed ≈ the fp32 weights.
"""

from __future__ import annotations

import sys
from pathlib import Path

from piip.data.files import write_torch
from piip.errors import CheckpointError
from piip.run.checkpoints import read_checkpoint
from piip.run.cli import OneLineArgumentParser, run_tool
from piip.run.sharded import CONSOLIDATED_SUFFIX, is_sharded_checkpoint


def consolidate(folder: Path, out: Path | None = None) -> Path:
    """Write `<folder stem>.consolidated.ckpt` beside the folder (or `out`); returns the path written."""
    if not folder.exists():
        raise CheckpointError(f"{folder}: no such checkpoint folder")
    if not is_sharded_checkpoint(folder):
        raise CheckpointError(
            f"{folder} is not a sharded checkpoint folder (expected meta.pt and .metadata in it, as "
            "trainer=fsdp writes them); a single-file checkpoint needs no consolidation"
        )
    out = out or folder.with_name(folder.stem + CONSOLIDATED_SUFFIX)
    if out.exists():
        raise CheckpointError(f"--out {out} exists; remove it or choose another path")
    return write_torch(out, read_checkpoint(folder))


def main(argv: list[str] | None = None) -> int:
    parser = OneLineArgumentParser(
        prog="python -m piip.tools.consolidate", description=__doc__.splitlines()[0]
    )
    parser.add_argument("checkpoint", type=Path, help="sharded checkpoint folder, e.g. checkpoints/last.ckpt")
    parser.add_argument("--out", type=Path, default=None, help="file to write (default: beside the folder)")
    args = parser.parse_args(argv)
    path = consolidate(args.checkpoint.expanduser(), args.out)
    print(f"consolidated: {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    run_tool("consolidate", main, sys.argv[1:])
