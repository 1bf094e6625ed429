"""GPU memory per device for training a model, estimated on the CPU without allocating anything (the
accounting engine; `python -m piip.tools.memory` builds the model from a config and prints the table).

Why an estimate: we plan GPU runs (DDP or FSDP, with or without activation checkpointing) without a GPU.
The task model (backbone + task heads) is built as `train.py` builds it (`piip.run.build.build_task`),
but on the meta device; its parameters become fake tensors (`FakeTensorMode`: shapes and dtypes, no
storage) and one training forward (the task's `probe_loss`) runs on them under
`torch.autocast("cpu", bfloat16)`, the way Lightning's bf16-mixed wraps a step. Inside
`torch.autograd.graph.saved_tensors_hooks`, every distinct storage autograd keeps for backward is counted
once while it lives; parameters themselves are not (they are model state). Counting at 2 and 4
images splits the bytes into a per-image slope (activations) and a constant (mostly autocast's bf16 weight
copies, which autograd saves for backward and the autocast cache holds until the forward ends). Checked
against real tensors: `validate=true`, tests/test_memory.py.

Assumptions, per GPU (say them wherever the figures are quoted):
* Model state: fp32 weights, fp32 gradients and AdamW's two fp32 moments: 16 B per trainable parameter,
  4 B per frozen one; fp32 buffers and the EMA copy (classification) stay on every GPU.
  DDP: all of it on every GPU, plus DDP's gradient buckets (another 4 B per trainable parameter, since
  `gradient_as_bucket_view` is off as Lightning leaves it), plus autocast's cache of bf16 weight copies
  (bf16 only): 2 B per parameter of the linear and conv layers (or the counted constant, if larger), full at
  the end of the forward with or without checkpointing.
  FSDP (full sharding over `devices`, one unit per branch block and per interaction unit as
  piip.distributed.fsdp shards, the rest counted as one root unit): the state divided by `devices`, plus
  the transient bf16 all-gather of the root unit and of the largest unit twice (the running one and the
  prefetched one) and that unit's unsharded gradient (bf16, then fp32 for the reduce-scatter); no autocast
  weight copies (the gathered weights are bf16 already, and freed unit by unit).
* The optimizer step (foreach AdamW) allocates a temporary sqrt of the second moment: 4 B per trainable
  parameter of the (shard of the) model, at a time when activations are gone; the total takes the larger.
* Activations are counted for one forward + backward at the task's worst-case training input (detection:
  long side padded both ways, as a batch mixing a landscape and a portrait image pads; segmentation: the
  crop; otherwise the highest branch resolution, square). Detection heads: FPN neck and RPN head exactly,
  the RoI heads on the sampler's maximum (box RoIs per image, their positive fraction for masks); the
  data-dependent parts (anchors, proposals, losses) are left out. Segmentation: UperNet + FCN heads and the
  full-resolution cross-entropy. Classification: the backbone's classifier (the loss itself is negligible).
  With grad checkpointing (per branch block and interaction unit, non-reentrant) only each unit's inputs
  are saved, and backward recomputes one unit at a time: its activations are added once.
* Autocast uses the CPU op lists, close to CUDA's for the ops these models run (matmuls and convs in
  bf16; the residual stream stays fp32). Attention saves O(tokens) as flash/memory-efficient SDPA does.
* Not counted: CUDA context and allocator fragmentation (typically 1-3 GiB), transient tensors inside an
  op and the gradient of activations in flight during backward, data-loader pinned memory. Gradients and
  all activations are added as if they coexisted, which slightly overstates the backward peak.

`validate=true` (small models only) also builds the model for real on the CPU and measures one step with
real tensors (same dtype): the bytes saved for backward and the peak of live tensor bytes.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from piip.models.backbone.backbone import PIIPBackbone
from piip.models.backbone.convs import CASTS_WEIGHTS_PER_CALL
from piip.tasks.base import backbone_probe_loss

TRAINABLE_BYTES = 16  # fp32 weight + fp32 gradient + AdamW exp_avg + exp_avg_sq
FROZEN_BYTES = 4
BUCKET_BYTES = 4  # DDP gradient buckets (a second copy of the gradients)
REDUCE_BYTES = 4  # FSDP reduce-scatters gradients in fp32
STEP_TEMP_BYTES = 4  # foreach AdamW: sqrt(exp_avg_sq) of every parameter of a group at once
MATMUL_LAYERS = (nn.Linear, nn.modules.conv._ConvNd)
BATCHES = (2, 4)  # images per forward for the slope and constant; not 1: BatchNorm refuses one value


def backbone_of(model: nn.Module) -> PIIPBackbone:
    return model if isinstance(model, PIIPBackbone) else model.backbone


def to_fake(module: nn.Module, mode: FakeTensorMode) -> None:
    """Swap every parameter and buffer for a fake CPU tensor of the same shape, dtype and requires_grad.

    Built on meta first: timm's constructors read values (`.item()`), which fake tensors cannot give.
    """
    swapped: dict[int, torch.Tensor] = {}  # shared tensors stay shared
    with mode:
        for sub in module.modules():
            for table in (sub._parameters, sub._buffers):
                for name, tensor in table.items():
                    if tensor is None:
                        continue
                    if id(tensor) not in swapped:
                        fake = torch.empty(tensor.shape, dtype=tensor.dtype)
                        if isinstance(tensor, nn.Parameter):
                            fake = nn.Parameter(fake, requires_grad=tensor.requires_grad)
                        swapped[id(tensor)] = fake
                    table[name] = swapped[id(tensor)]


def parameter_counts(model: nn.Module, ema: bool) -> dict[str, int]:
    """Trainable and frozen parameters of the trained model; buffers and the backbone's EMA copy apart."""
    params = list(model.parameters())
    backbone = backbone_of(model)
    unit_sizes = [sum(p.numel() for p in unit.parameters()) for unit in backbone.shard_units()]
    copied = sum(t.numel() for t in (*backbone.parameters(), *backbone.buffers()))
    return {
        "total": sum(p.numel() for p in params),
        "trainable": sum(p.numel() for p in params if p.requires_grad),
        "frozen": sum(p.numel() for p in params if not p.requires_grad),
        "ema": copied if ema else 0,
        "buffer_bytes": sum(b.numel() * b.element_size() for b in model.buffers()),
        "autocast": sum(  # what autocast casts to bf16 and caches: weights and biases of matmuls and convs
            p.numel()
            for m in model.modules()
            if isinstance(m, MATMUL_LAYERS) and not isinstance(m, CASTS_WEIGHTS_PER_CALL)
            for p in m.parameters()
            if p.requires_grad
        ),
        "largest_unit": max(unit_sizes, default=0),
        "in_units": sum(unit_sizes),
    }


# -- counting saved tensors -------------------------------------------------------------------------------
class SavedTensors:
    """Bytes of the distinct storages autograd holds for backward (views of one storage count once).

    A storage leaves the count when it is freed: graph parts no loss depends on (the unread last interaction
    of cls-token classification) die during the forward, and their saved tensors with them.
    """

    def __init__(self, exclude: set[int]) -> None:
        self.exclude = exclude  # storages of parameters and buffers: model state, not activations
        self.bytes = 0
        self.by_dtype: dict[str, int] = {}
        self._held: dict[int, tuple[int, str]] = {}

    def _freed(self, key: int) -> None:
        size, dtype = self._held.pop(key)
        self.bytes -= size
        self.by_dtype[dtype] -= size

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage._cdata  # the storage's address: unique while it lives
        if key not in self.exclude and key not in self._held:
            dtype = str(tensor.dtype).removeprefix("torch.")
            self._held[key] = (storage.nbytes(), dtype)
            self.bytes += storage.nbytes()
            self.by_dtype[dtype] = self.by_dtype.get(dtype, 0) + storage.nbytes()
            weakref.finalize(storage, self._freed, key)
        # detached: a node saving its own output would otherwise hold it with its grad_fn, a reference
        # cycle that keeps graph parts alive after nothing needs them
        return tensor.detach()

    @contextlib.contextmanager
    def counting(self) -> Iterator[None]:
        with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor):
            yield


def storage_keys(model: nn.Module) -> set[int]:
    return {t.untyped_storage()._cdata for t in (*model.parameters(), *model.buffers())}


def probe_loss(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """A loss through every output the model trains: the task's own `probe_loss` (its heads where their cost
    does not depend on the data), or all outputs of a bare backbone."""
    if isinstance(model, PIIPBackbone):
        return backbone_probe_loss(model(images))
    return model.probe_loss(images)


def head_scope(model: nn.Module) -> str:
    """Which heads the activation count runs, in words: the first line of the task's `probe_loss` doc."""
    if isinstance(model, PIIPBackbone):
        return "backbone only"
    return inspect.getdoc(model.probe_loss).splitlines()[0].rstrip(".")


@dataclass
class Count:
    """Saved-for-backward bytes of one training forward at `batch` images."""

    batch: int
    saved: int
    by_dtype: dict[str, int]
    units: list[int]  # bytes saved inside each checkpoint unit (without checkpointing only)


def count_saved(model: nn.Module, batch: int, size: tuple[int, int], bf16: bool) -> Count:
    """One forward of `model` (fake tensors) under the hooks; backward is never run."""
    counter = SavedTensors(storage_keys(model))
    units = backbone_of(model).shard_units()
    inside = [0] * len(units)
    handles = []
    if not backbone_of(model).grad_checkpointing:
        for i, unit in enumerate(units):

            def before(_m: nn.Module, _a: Any, i: int = i) -> None:
                inside[i] -= counter.bytes

            def after(_m: nn.Module, _a: Any, _o: Any, i: int = i) -> None:
                inside[i] += counter.bytes

            handles += [unit.register_forward_pre_hook(before), unit.register_forward_hook(after)]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    try:
        with counter.counting(), autocast:
            loss = probe_loss(model, torch.empty(batch, 3, *size))
        saved, by_dtype = counter.bytes, {k: v for k, v in counter.by_dtype.items() if v}  # graph alive
        del loss
    finally:
        for handle in handles:
            handle.remove()
    return Count(batch, saved, by_dtype, inside)


def activation_figures(model: nn.Module, size: tuple[int, int], bf16: bool) -> dict[str, Any]:
    """Per-image activations and the per-step constant, without and with grad checkpointing."""
    backbone = backbone_of(model)
    figures: dict[str, Any] = {}
    plain: tuple[Count, Count] | None = None
    for checkpointing in (False, True):
        backbone.set_grad_checkpointing(checkpointing)
        low, high = (count_saved(model, b, size, bf16) for b in BATCHES)
        images = BATCHES[1] - BATCHES[0]
        per_image = (high.saved - low.saved) // images
        entry = {
            "per_image": per_image,
            "constant": max(low.saved - BATCHES[0] * per_image, 0),
            "per_image_by_dtype": {
                k: (high.by_dtype[k] - low.by_dtype.get(k, 0)) // images for k in high.by_dtype
            },
        }
        if checkpointing and plain is not None:
            # backward recomputes one unit at a time: the largest unit's activations exist once more
            entry["recompute_per_image"] = max(
                ((b - a) // images for a, b in zip(plain[0].units, plain[1].units, strict=True)), default=0
            )
        else:
            plain = (low, high)
        figures["checkpointing" if checkpointing else "plain"] = entry
    backbone.set_grad_checkpointing(False)
    return figures


# -- totals -----------------------------------------------------------------------------------------------
def state_figures(params: dict[str, int], devices: int, bf16: bool) -> dict[str, float]:
    """Model state per GPU (bytes) under DDP and FSDP; what the optimizer step and FSDP add transiently."""
    replicated = params["buffer_bytes"] + 4 * params["ema"]
    sharded = TRAINABLE_BYTES * params["trainable"] + FROZEN_BYTES * params["frozen"]
    gathered = 2 if bf16 else 4
    root = params["total"] - params["in_units"]
    return {
        "ddp": sharded + BUCKET_BYTES * params["trainable"] + replicated,
        "fsdp": sharded / devices + replicated,
        # gathered: the root remainder and the largest unit twice (running, prefetched); its gradient:
        # computed in the gathered dtype, then reduce-scattered in fp32 (piip.distributed.fsdp's default)
        "fsdp_transient": gathered * (root + 2 * params["largest_unit"])
        + (gathered + REDUCE_BYTES) * params["largest_unit"],
        "step_ddp": STEP_TEMP_BYTES * params["trainable"],
        "step_fsdp": STEP_TEMP_BYTES * params["trainable"] / devices,
    }


def totals(
    state: dict[str, float], acts: dict[str, Any], batch: int, autocast_cache: int
) -> dict[str, dict[str, float]]:
    """Peak bytes per GPU: state + the larger of (forward/backward, optimizer step)."""
    out = {}
    # DDP: autocast's cache of bf16 weights is full when the forward ends, with checkpointing or not; the
    # count finds the copies saved for backward, the cache also holds those nothing saves (first layers)
    constant = max(acts["plain"]["constant"], autocast_cache)
    for name, entry in acts.items():
        per_image = entry["per_image"] + entry.get("recompute_per_image", 0)
        out[name] = {
            "activations_per_image": per_image,
            "ddp": state["ddp"] + max(constant + batch * per_image, state["step_ddp"]),
            "fsdp": state["fsdp"] + max(state["fsdp_transient"] + batch * per_image, state["step_fsdp"]),
        }
    return out


# -- measured with real tensors (validation, small models) ------------------------------------------------
class LiveTensorBytes(TorchDispatchMode):
    """Bytes of tensor storages alive, and their peak, for tensors made by ops while the mode is on."""

    def __init__(self, existing: set[int]) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._existing = existing  # storages made before (parameters): views of them cost nothing new
        self._sizes: dict[int, int] = {}

    def _freed(self, key: int) -> None:
        self.live -= self._sizes.pop(key)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key = storage._cdata
                if key not in self._sizes and key not in self._existing:
                    self._sizes[key] = storage.nbytes()
                    self.live += storage.nbytes()
                    weakref.finalize(storage, self._freed, key)
        self.peak = max(self.peak, self.live)
        return out


def measure_real(
    build: Callable[[], nn.Module], size: tuple[int, int], batch: int, bf16: bool
) -> dict[str, dict[str, int]]:
    """One real training step on the CPU, without and with grad checkpointing: bytes saved for backward, and
    live tensor bytes (over the parameters) after the forward and at their peak in forward and backward.
    `build` makes the model on the CPU (seeded here, so every run measures the same weights)."""
    with one_thread():
        torch.manual_seed(0)
        return _measure_real(build().train(), size, batch, bf16)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Real CPU steps on one thread: bytes do not depend on it, and on a shared machine OpenMP threads
    spinning against other processes made the tiny test model's step take 20 s instead of 0.4 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _measure_real(
    model: nn.Module, size: tuple[int, int], batch: int, bf16: bool
) -> dict[str, dict[str, int]]:
    images = torch.randn(batch, 3, *size)
    gradients = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    measured = {}
    for checkpointing in (False, True):
        backbone_of(model).set_grad_checkpointing(checkpointing)
        model.zero_grad(set_to_none=True)
        counter = SavedTensors(storage_keys(model))
        tracker = LiveTensorBytes(storage_keys(model))
        with tracker:
            with counter.counting(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = probe_loss(model, images.clone())  # the batch counts, as in the estimate
            figures = {
                "saved": counter.bytes,
                "live_after_forward": tracker.live,
                "peak_forward": tracker.peak,
            }
            loss.backward()
        del loss
        figures.update(peak_forward_backward=tracker.peak, gradients=gradients)
        measured["checkpointing" if checkpointing else "plain"] = figures
    return measured
