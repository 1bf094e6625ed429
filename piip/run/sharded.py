"""Reading the sharded checkpoints `trainer=fsdp` writes, without a process group.

A sharded checkpoint is a folder (named like the file it replaces, e.g. `last.ckpt/`): torch distributed
checkpoint (DCP) shards of `state_dict` and `optimizer_0` written by every rank, plus Lightning's `meta.pt`
with everything else (hyper-parameters with the run config, loops, callbacks). Here it becomes the same
dictionary a single-file checkpoint holds, so evaluation, `init_from` and resume checks treat both alike.
`FSDP2Strategy.save_checkpoint` fills such a folder as a hidden sibling and swaps it in
(`piip.data.files.replace_folder`), so a folder under its final name is always complete.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

META_FILE = "meta.pt"  # Lightning's ModelParallelStrategy: the non-tensor part of the checkpoint
DCP_METADATA = ".metadata"
WEIGHTS = "state_dict"
CONSOLIDATED_SUFFIX = ".consolidated.ckpt"  # weights only: never a resume candidate


def is_sharded_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / META_FILE).is_file() and (path / DCP_METADATA).is_file()


def weight_shapes(path: str | Path) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Name → (global shape, dtype) of every model weight, from the DCP metadata alone."""
    metadata = dcp.FileSystemReader(str(path)).read_metadata()
    prefix = f"{WEIGHTS}."
    return {
        key[len(prefix) :]: (item.size, item.properties.dtype)
        for key, item in metadata.state_dict_metadata.items()
        if key.startswith(prefix) and isinstance(item, TensorStorageMetadata)
    }


def read_sharded_checkpoint(path: str | Path, weights: bool = True) -> dict[str, Any]:
    """The checkpoint as one dictionary, weights gathered into full CPU tensors (optimizer state left out).

    With `weights=False` the state dict holds meta tensors of the right shapes: enough to check that a
    checkpoint fits a model without reading gigabytes.
    """
    path = Path(path)
    checkpoint = torch.load(path / META_FILE, map_location="cpu", weights_only=True)
    device = "cpu" if weights else "meta"
    shapes = weight_shapes(path)
    state = {name: torch.empty(shape, dtype=dtype, device=device) for name, (shape, dtype) in shapes.items()}
    if weights:
        dcp.load({WEIGHTS: state}, checkpoint_id=str(path), no_dist=True)
    checkpoint[WEIGHTS] = state
    return checkpoint
