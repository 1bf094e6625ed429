"""Writing files a user keeps (results, predictions) so that a crash never leaves a truncated one."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_json(path: str | Path, record: Any, indent: int | None = 2) -> Path:
    """Write atomically (temporary file in the same folder + rename); `indent=None` writes compactly."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
        json.dump(record, f, indent=indent, sort_keys=True)
        tmp = f.name
    os.replace(tmp, path)
    return path


def write_torch(path: str | Path, obj: Any) -> Path:
    """`torch.save` atomically, for checkpoints (a temporary file in the same folder + rename)."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("wb", dir=path.parent, suffix=".tmp", delete=False) as f:
        tmp = f.name
        try:
            torch.save(obj, f)
        except BaseException:
            os.unlink(tmp)
            raise
    os.replace(tmp, path)
    return path
