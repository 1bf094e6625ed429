"""Finding non-finite values in many tensors at the cost of one fused reduction, and naming them afterwards.

Shared by the training guard (`PIIPTask`: loss, gradients before the optimizer step, weights after it), the
checkpoint writers (`piip.run.checkpoint_io`, `piip.distributed.fsdp`) and the search for the last finite
checkpoint. The fast path is one `torch._foreach_norm` per device (an L2 norm is NaN or inf whenever an
element is) and one host sync; only when it fires are tensors inspected one by one, which also drops the
rare false alarm of a finite tensor whose norm overflows fp32.

Sharded tensors (FSDP2 `DTensor`s) are checked on their local shard; a flag is then all-reduced so every
rank reaches the same verdict (a rank that raised alone would leave the others waiting in a collective).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.strategies.model_parallel import _METADATA_FILENAME as SHARDED_META
from torch.distributed.tensor import DTensor

from piip.errors import CheckpointError

# Reads a checkpoint (file or sharded folder) and returns its `state_dict` (the model weights).
ReadWeights = Callable[[Path], Mapping[str, Any]]


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _checked(tensors: Iterable[Any]) -> tuple[list[torch.Tensor], bool]:
    """The local floating tensors worth checking, and whether any of them is a shard."""
    local, sharded = [], False
    for tensor in tensors:
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            continue
        sharded = sharded or isinstance(tensor, DTensor)
        tensor = _local(tensor).detach()
        if tensor.numel():
            local.append(tensor)
    return local, sharded


def _sharded_world() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _any_rank(flag: torch.Tensor | bool, device: torch.device) -> bool:
    """`flag` or'ed over all ranks (one small all-reduce)."""
    if isinstance(flag, bool):
        flag = torch.tensor(flag)
    if "nccl" in str(dist.get_backend()) and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())  # NCCL reduces GPU tensors only
    elif dist.get_backend() == "gloo":
        device = torch.device("cpu")
    flag = flag.to(device, torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _fused_flag(local: list[torch.Tensor], shared: bool) -> bool:
    """Whether any of `local` may hold NaN/inf: one `_foreach_norm` per (device, fp64 or not), one sync;
    or'ed over the ranks when `shared`."""
    groups: dict[tuple[torch.device, bool], list[torch.Tensor]] = defaultdict(list)
    for tensor in local:  # norms of fp16/bf16/fp32 accumulate in fp32; fp64 keeps its own precision
        groups[tensor.device, tensor.dtype == torch.float64].append(tensor)
    flags = [
        (~torch.isfinite(torch.stack(torch._foreach_norm(group, 2, None if double else torch.float32)))).any()
        for (_, double), group in groups.items()
    ]
    device = next(iter(groups), (torch.device("cpu"),))[0]
    bad = torch.stack([f.to(device) for f in flags]).any() if flags else torch.zeros((), dtype=torch.bool)
    return _any_rank(bad, device) if shared else bool(bad.item())


def maybe_nonfinite(tensors: Iterable[Any], sharded: bool | None = None) -> bool:
    """True if any floating tensor may hold NaN/inf (one fused norm per device, one sync; agreed across
    ranks when the tensors are shards or `sharded=True`). May answer True for finite tensors with huge
    values: `find_nonfinite` confirms."""
    local, has_shards = _checked(tensors)
    return _fused_flag(local, (has_shards if sharded is None else sharded) and _sharded_world())


def nonfinite_names(named: Iterable[tuple[str, Any]]) -> list[str]:
    """Names of the floating tensors (this rank's shards) holding NaN/inf, one check per tensor: the slow
    path, after `maybe_nonfinite` fired."""
    return [
        name
        for name, tensor in named
        if isinstance(tensor, torch.Tensor)
        and tensor.is_floating_point()
        and not bool(torch.isfinite(_local(tensor).detach()).all())
    ]


def find_nonfinite(named: Mapping[str, Any], sharded: bool | None = None) -> tuple[bool, list[str]]:
    """Whether any rank holds a non-finite floating tensor of `named`, and the names of this rank's ones.

    Cheap when all are finite (`maybe_nonfinite`). Shards (or `sharded=True`): every rank gets the same
    verdict, so all of them stop together."""
    local, has_shards = _checked(named.values())
    shared = (has_shards if sharded is None else sharded) and _sharded_world()
    if not _fused_flag(local, shared):
        return False, []
    names = nonfinite_names(named.items())
    return (_any_rank(bool(names), torch.device("cpu")) if shared else bool(names)), names


def describe(names: list[str], total: int, shown: int = 5) -> str:
    """`3 of 105 tensors (a, b, c)`: the count and the first names (none here: another rank's shards)."""
    if not names:
        return f"tensors of another rank's shards (none of this rank's {total})"
    more = ", ..." if len(names) > shown else ""
    return f"{len(names)} of {total} tensors ({', '.join(names[:shown])}{more})"


def checkpoint_candidates(folders: Iterable[Path]) -> list[Path]:
    """Every checkpoint (`*.ckpt` file or sharded folder) in `folders`, newest first; hidden temporaries are
    left out."""

    def saved_at(path: Path) -> float:  # a sharded folder's own mtime does not change when it is rewritten
        meta = path / SHARDED_META
        return (meta if meta.is_file() else path).stat().st_mtime

    found = {p for folder in folders if folder.is_dir() for p in folder.glob("*.ckpt")}
    return sorted((p for p in found if not p.name.startswith(".")), key=saved_at, reverse=True)


def read_file_weights(path: Path) -> Mapping[str, Any]:
    """A single-file checkpoint's weights (memory-mapped, `weights_only`): the reader when the trainer's
    checkpoint IO offers none (`read_weights`)."""
    if path.is_dir():
        raise ValueError("a sharded folder: read it with piip.run.checkpoint_io.AtomicCheckpointIO")
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)["state_dict"]


def last_finite_checkpoint(candidates: Iterable[Path], read: ReadWeights) -> tuple[Path | None, list[str]]:
    """The first of `candidates` (newest first) whose weights, read from the file, are all finite; and a
    note for each one skipped (unreadable, or holding non-finite tensors)."""
    skipped = []
    for path in candidates:
        try:
            weights = read(path)
        except Exception as err:  # noqa: BLE001 - any unreadable file is simply not a good checkpoint
            skipped.append(f"{path.name}: unreadable ({err})")
            continue
        _, bad = find_nonfinite(weights, sharded=False)
        if not bad:
            return path, skipped
        skipped.append(f"{path.name}: holds non-finite weights, {describe(bad, len(weights))}")
    return None, skipped


def refuse_nonfinite_checkpoint(state_dict: Mapping[str, Any], path: str | Path) -> None:
    """Raise CheckpointError, before anything is written, if the weights to save hold NaN/inf: the file at
    `path` keeps its previous version. Shards are checked where they live, the verdict shared by all ranks."""
    anywhere, bad = find_nonfinite(state_dict)
    if anywhere:
        where = f" on rank {dist.get_rank()}" if _sharded_world() else ""
        raise CheckpointError(
            f"refusing to write checkpoint {path}: its state_dict holds non-finite values in "
            f"{describe(bad, len(state_dict))}{where}; the previous {Path(path).name} is left as it was. "
            "Weights went non-finite during training: lower task.optim.lr or set task.optim.gradient_clip."
        )
