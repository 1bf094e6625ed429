"""FSDP2 for PIIP: every transformer block of every branch (and of a language model) is its own shard unit.

`trainer=fsdp` selects `FSDP2Strategy`, a Lightning `ModelParallelStrategy` that shards over all processes
(pure data parallelism; no tensor parallelism) and lets the task say which modules are blocks
(`PIIPTask.shard_units`); the task asks for it from `configure_model` through `shard_task`, without
knowing this class. Mixed precision is FSDP2's own policy: fp32 master weights sharded across ranks,
bf16 copies gathered for compute and communication, gradients reduced in fp32, while ops run under
Lightning's bf16 autocast (`precision: bf16-mixed`) exactly as under DDP: the deformable interaction, RoI
ops and losses keep their fp32 math, and BatchNorm layers keep fp32 parameters (units of their own).
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.nn.modules.batchnorm import _BatchNorm

from piip.data.files import fsync_tree, replace_folder, temp_sibling
from piip.errors import ConfigError
from piip.tasks.finite import refuse_nonfinite_checkpoint

FP32_POLICY = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _dtype(name: str, field: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"trainer.strategy.{field}={name!r}: expected one of {sorted(DTYPES)}")
    return DTYPES[name]


class FSDP2Strategy(ModelParallelStrategy):
    """Fully sharded data parallelism over every device of every node, one shard unit per block.

    Why `ModelParallelStrategy` and not Lightning's `FSDPStrategy`: the latter wraps modules in FSDP1's
    `FullyShardedDataParallel`, which flattens each unit's parameters into one buffer (frozen and trainable
    parameters mixed in a unit need `use_orig_params`, and the optimizer state is keyed by flat buffers).
    FSDP2's `fully_shard` shards per parameter and keeps names, so layer-wise lr decay, PIIP-LLaVA's frozen
    parts and checkpoint keys stay as they are. Checkpoints are sharded folders
    (`python -m piip.tools.consolidate` makes one file), written atomically (`save_checkpoint`).
    """

    def __init__(
        self,
        param_dtype: str = "bf16",
        reduce_dtype: str = "fp32",
        reshard_after_forward: bool = True,
        save_distributed_checkpoint: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            **kwargs,
        )
        # inputs are not cast: autocast decides op by op, as under DDP (boxes and targets stay fp32)
        self.mp_policy = MixedPrecisionPolicy(
            param_dtype=_dtype(param_dtype, "param_dtype"),
            reduce_dtype=_dtype(reduce_dtype, "reduce_dtype"),
            cast_forward_inputs=False,
        )
        self.reshard_after_forward = reshard_after_forward

    def setup(self, trainer: Any) -> None:
        if self.mp_policy.param_dtype not in (None, torch.float32) and not isinstance(
            self.precision_plugin, MixedPrecision
        ):
            raise ConfigError(
                f"trainer.strategy.param_dtype={self.mp_policy.param_dtype}: low-precision parameters "
                "compute under autocast (fp32 islands: deformable sampling, RoI ops, losses); set "
                "trainer.precision=bf16-mixed, or trainer.strategy.param_dtype=fp32"
            )
        super().setup(trainer)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes  # every rank holds a shard
        super().setup_environment()

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: str | Path, storage_options: Any | None = None
    ) -> None:
        """A sharded folder never half-written under its final name: refuse non-finite weights (every rank
        checks its shards, the verdict is shared), let every rank write into the sibling temp folder
        `.<name>.<hex>.tmp`, then rank 0 fsyncs it and swaps it in (`piip.data.files.replace_folder`).

        With `save_distributed_checkpoint: false` the single file goes through the trainer's CheckpointIO
        (`piip.run.checkpoint_io.AtomicCheckpointIO`: same rules)."""
        if not self._save_distributed_checkpoint:
            super().save_checkpoint(checkpoint, filepath, storage_options)
            return
        path = Path(self.broadcast(str(filepath)))
        refuse_nonfinite_checkpoint(checkpoint.get("state_dict", {}), path)
        temp = Path(self.broadcast(str(temp_sibling(path))))
        super().save_checkpoint(checkpoint, temp, storage_options)
        self.barrier("piip: sharded checkpoint written")
        if self.global_rank == 0:
            fsync_tree(temp)
            replace_folder(temp, path)
        self.barrier("piip: sharded checkpoint in place")

    def shard_task(self, task: nn.Module) -> None:
        """Shard a task once (Lightning calls `configure_model` for fit and again for test): its
        `shard_units()` one by one, then its other children; then register the extra entry points its
        sharded units need (`sharded_forward_methods()`: name -> (unit, function))."""
        if any(isinstance(m, FSDPModule) for m in task.modules()):
            return
        self.shard(task, task.shard_units())
        for name, (unit, function) in task.sharded_forward_methods().items():
            if isinstance(unit, FSDPModule) and not hasattr(unit, name):
                add_forward_method(unit, name, function)

    def shard(self, root: nn.Module, units: Iterable[nn.Module]) -> None:
        """`fully_shard` each unit, then every remaining top-level child of `root` (embeddings, heads).

        The LightningModule itself is not wrapped (FSDP2 would change its class); its direct children
        become the outermost units, each gathering its leftover parameters in one collective.
        """
        mesh = self.device_mesh["data_parallel"]
        options = {"mesh": mesh, "mp_policy": self.mp_policy}
        if self._layer_sync is not None:  # trainer.sync_batchnorm (ADE20K heads); DDP applies it in setup
            self._layer_sync.apply(root)
        for norm in [m for m in root.modules() if isinstance(m, _BatchNorm)]:
            fully_shard(norm, mesh=mesh, mp_policy=FP32_POLICY)  # running statistics need fp32 (FSDP1's rule)
        for unit in units:
            fully_shard(unit, reshard_after_forward=self.reshard_after_forward, **options)
        for child in root.children():
            if any(p.numel() for p in child.parameters()):
                fully_shard(child, **options)


def add_forward_method(unit: nn.Module, name: str, function: Callable[..., Any]) -> None:
    """Give a sharded unit a second entry point that gathers its parameters as `forward` does."""
    setattr(unit, name, types.MethodType(function, unit))
    register_fsdp_forward_method(unit, name)
