"""The Lightning `CheckpointIO` every piip trainer writes its single-file checkpoints through.

Why not Lightning's `TorchCheckpointIO`: its fsspec "transaction" writes to a temporary file in `$TMPDIR`
and moves it onto the target; when `$TMPDIR` is on another filesystem the move copies into `last.ckpt` in
place, and a kill mid-copy left a 0-byte `last.ckpt` with the previous good one gone. Here the temporary
file lives beside the target and is renamed over it (`piip.data.files.write_torch`), and a checkpoint
whose weights hold NaN/inf is refused before anything is written, so the previous file stays.

`piip.run.build.build_trainer` passes it to every Trainer. Sharded folders (`trainer=fsdp`) are written by
the strategy itself (`piip.distributed.fsdp.FSDP2Strategy.save_checkpoint`, same rules); this plugin also
reads them back (`read_weights`) when the training guard looks for the last finite checkpoint.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.types import _PATH

from piip.data.files import write_torch
from piip.run import sharded
from piip.tasks.finite import read_file_weights, refuse_nonfinite_checkpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    """`torch.save` to `.<name>.<hex>.tmp` in the target's folder, fsync, `os.replace`, fsync the folder;
    only finite weights. Remote URLs (`s3://…`) keep Lightning's own writing."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options (got {storage_options!r})")
        refuse_nonfinite_checkpoint(checkpoint.get("state_dict", {}), path)
        if "://" in os.fspath(path):
            super().save_checkpoint(checkpoint, path)
            return
        write_torch(path, checkpoint)

    def read_weights(self, path: str | Path) -> Mapping[str, Any]:
        """The `state_dict` of a checkpoint file or sharded folder, read from disk (memory-mapped)."""
        path = Path(path)
        if sharded.is_sharded_checkpoint(path):
            return sharded.read_sharded_checkpoint(path)[sharded.WEIGHTS]
        return read_file_weights(path)
