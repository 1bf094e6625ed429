"""GPU memory per device for training a model on a task, estimated on the CPU without allocating anything.

    python -m piip.tools.memory model=piip_tsb task=coco resolution=1568_896_448
    python -m piip.tools.memory experiment=coco_piip_h6b_1024_512 grad_checkpointing=null format=markdown
    python -m piip.tools.memory model=piip_tiny task=coco dtype=fp32 validate=true

Why an estimate: we plan GPU runs (DDP or FSDP, with or without activation checkpointing) without a GPU.
The task model (backbone + task heads) is built as `train.py` builds it (`piip.run.build.build_task`), but on the
meta device; its parameters become fake tensors (`FakeTensorMode`: shapes and dtypes, no storage) and one
training forward runs on them under `torch.autocast("cpu", bfloat16)`, the way Lightning's bf16-mixed wraps
a step. Inside `torch.autograd.graph.saved_tensors_hooks`, every distinct storage autograd keeps for backward
is counted once while it lives; parameters themselves are not (they are model state). Counting at 2 and 4
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
  FSDP (full sharding over `devices`, one unit per branch block and per interaction unit as piip.distributed.fsdp
  shards, the rest counted as one root unit): the state divided by `devices`, plus the transient bf16
  all-gather of the root unit and of the largest unit twice (the running one and the prefetched one) and
  that unit's unsharded gradient (bf16, then fp32 for the reduce-scatter); no autocast weight copies (the
  gathered weights are bf16 already, and freed unit by unit).
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
import json
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from piip.data.files import write_json
from piip.errors import ConfigError
from piip.evaluation.ade20k import IGNORE_INDEX as IGNORE
from piip.models import PIIPBackbone, PIIPConfig
from piip.models.heads.mask_rcnn import MaskRCNN
from piip.models.heads.upernet import resize
from piip.run.build import build_task, configure_cpu_math
from piip.run.cli import quote_resolution_overrides
from piip.run.config import CONF_DIR, backbone_dict

GIB = 2**30
KINDS_WITH_HEADS = ("detection", "segmentation", "classification")
DTYPES = ("bf16", "fp32")
TRAINABLE_BYTES = 16  # fp32 weight + fp32 gradient + AdamW exp_avg + exp_avg_sq
FROZEN_BYTES = 4
BUCKET_BYTES = 4  # DDP gradient buckets (a second copy of the gradients)
REDUCE_BYTES = 4  # FSDP reduce-scatters gradients in fp32
STEP_TEMP_BYTES = 4  # foreach AdamW: sqrt(exp_avg_sq) of every parameter of a group at once
MATMUL_LAYERS = (nn.Linear, nn.modules.conv._ConvNd)
MAX_VALIDATE_PARAMS = 500e6
BATCHES = (2, 4)  # images per forward for the slope and constant; not 1: BatchNorm refuses one value


# -- building ---------------------------------------------------------------------------------------------
def task_kind(cfg: DictConfig) -> str:
    return str((cfg.get("task") or {}).get("kind", "detection"))


def build_model(cfg: DictConfig, backbone: dict[str, Any], device: str = "meta") -> nn.Module:
    """The training model as `train.py` builds it (task heads included where the kind has them).

    Without its EMA copy: timm's `ModelEmaV3` cannot be built on meta; `parameter_counts` adds it back.
    """
    with torch.device(device):
        if task_kind(cfg) not in KINDS_WITH_HEADS or "module" not in cfg.task:
            return PIIPBackbone(PIIPConfig.from_dict(backbone))
        # only what the task reads: the trainer section would need Hydra's runtime to resolve
        keys = [k for k in ("task", "model", "paths", "seed", "resolution") if k in cfg]
        slim = OmegaConf.masked_copy(cfg, keys)
        if "optim" in slim.task:
            slim.task.optim.ema_decay = None
        return build_task(slim, backbone, load_pretrained=False)


def keeps_ema(cfg: DictConfig) -> bool:
    return bool(((cfg.get("task") or {}).get("optim") or {}).get("ema_decay"))


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
            if isinstance(m, MATMUL_LAYERS)
            for p in m.parameters()
            if p.requires_grad
        ),
        "largest_unit": max(unit_sizes, default=0),
        "in_units": sum(unit_sizes),
    }


def training_input(cfg: DictConfig, resolutions: list[int], batch_size: int) -> tuple[int, int]:
    """(H, W) of the largest batch tensor the backbone sees in training: memory has to fit the worst case."""
    requested = cfg.get("image_size")
    if requested is not None:
        sizes = [int(requested)] * 2 if isinstance(requested, int) else [int(v) for v in requested]
        if len(sizes) != 2 or min(sizes) <= 0:
            raise ConfigError(f"image_size: expected [H, W] or one side in pixels, got {requested}")
        return sizes[0], sizes[1]
    top = int(resolutions[0])
    if task_kind(cfg) != "detection" or "data" not in cfg.task:
        return top, top  # segmentation crops and classification inputs are square at the top resolution
    data = cfg.task.data
    scales = data.get("train_scales") or [data.get("scale") or [top, top * 800 // 1333]]
    long, short = max(int(s[0]) for s in scales), max(int(s[1]) for s in scales)
    if data.get("crop"):
        long, short = min(long, int(data.crop)), min(short, int(data.crop))
    divisor = int(((cfg.task.get("module") or {}).get("detector") or {}).get("size_divisible", 32))

    def pad(side: int) -> int:
        return -(-side // divisor) * divisor

    # the batch pads every image to the largest height and width in it; no aspect-ratio grouping, so a
    # batch of a landscape and a portrait image is long x long
    return (pad(long), pad(long)) if batch_size > 1 else (pad(short), pad(long))


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


def _sum_of_means(tensors: list[torch.Tensor]) -> torch.Tensor:
    return sum(t.float().mean() for t in tensors)


SCOPES = {
    "backbone": "backbone only",
    "classification": "backbone with its classifier",
    "segmentation": "backbone, UperNet + FCN heads and their loss",
    "detection": "backbone and Mask R-CNN heads, RoI heads at the sampler's maximum",
}


def head_scope(model: nn.Module, kind: str) -> str:
    """Which heads the activation count runs: the task's where they do not depend on the data."""
    if model is backbone_of(model):
        return "backbone"
    if kind == "segmentation" and hasattr(model, "decode_head"):
        return kind
    if kind == "detection" and isinstance(getattr(model, "detector", None), MaskRCNN):
        return kind
    return "classification" if kind == "classification" else "backbone"


def training_loss(model: nn.Module, kind: str, images: torch.Tensor) -> torch.Tensor:
    """A loss that reads every output the task trains, through the task's heads where they are static."""
    out = backbone_of(model)(images)
    scope = head_scope(model, kind)
    if scope == "backbone":
        tensors = out.pyramid or ([out.features] if out.features is not None else out.branch_maps)
        return _sum_of_means([*tensors, *([out.logits] if out.logits is not None else [])])
    if scope == "classification":
        return _sum_of_means([out.logits])
    if scope == "segmentation":
        labels = torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.long)
        losses = [
            F.cross_entropy(resize(head(out.pyramid).float(), labels.shape[-2:]), labels, ignore_index=IGNORE)
            for head in (model.decode_head, model.aux_head)
        ]
        return losses[0] + model.hparams.aux_weight * losses[1]
    detector = model.detector
    features = list(detector.neck(out.pyramid).values())
    objectness, deltas = detector.rpn.head(features)
    roi = detector.roi_heads
    channels = detector.neck.out_channels
    boxes = images.shape[0] * roi.fg_bg_sampler.batch_size_per_image
    masks = int(boxes * roi.fg_bg_sampler.positive_fraction)
    box_size, mask_size = roi.box_roi_pool.output_size, roi.mask_roi_pool.output_size
    # RoIAlign outputs as new leaves (needing gradients, as the real ones): roi_align saves only the boxes
    box_features = torch.empty(boxes, channels, *box_size, requires_grad=True)
    mask_features = torch.empty(masks, channels, *mask_size, requires_grad=True)
    scores, regression = roi.box_predictor(roi.box_head(box_features))
    mask_logits = roi.mask_predictor(roi.mask_head(mask_features))
    return _sum_of_means([*objectness, *deltas, scores, regression, mask_logits])


@dataclass
class Count:
    """Saved-for-backward bytes of one training forward at `batch` images."""

    batch: int
    saved: int
    by_dtype: dict[str, int]
    units: list[int]  # bytes saved inside each checkpoint unit (without checkpointing only)


def count_saved(model: nn.Module, kind: str, batch: int, size: tuple[int, int], bf16: bool) -> Count:
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
            loss = training_loss(model, kind, torch.empty(batch, 3, *size))
        saved, by_dtype = counter.bytes, {k: v for k, v in counter.by_dtype.items() if v}  # graph alive
        del loss
    finally:
        for handle in handles:
            handle.remove()
    return Count(batch, saved, by_dtype, inside)


def activation_figures(model: nn.Module, kind: str, size: tuple[int, int], bf16: bool) -> dict[str, Any]:
    """Per-image activations and the per-step constant, without and with grad checkpointing."""
    backbone = backbone_of(model)
    figures: dict[str, Any] = {}
    plain: tuple[Count, Count] | None = None
    for checkpointing in (False, True):
        backbone.set_grad_checkpointing(checkpointing)
        low, high = (count_saved(model, kind, b, size, bf16) for b in BATCHES)
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
    cfg: DictConfig, backbone: dict[str, Any], size: tuple[int, int], batch: int, bf16: bool
) -> dict[str, dict[str, int]]:
    """One real training step on the CPU, without and with grad checkpointing: bytes saved for backward, and
    live tensor bytes (over the parameters) after the forward and at their peak in forward and backward."""
    with one_thread():
        return _measure_real(cfg, backbone, size, batch, bf16)


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
    cfg: DictConfig, backbone: dict[str, Any], size: tuple[int, int], batch: int, bf16: bool
) -> dict[str, dict[str, int]]:
    torch.manual_seed(0)
    model = build_model(cfg, backbone, "cpu").train()
    kind = task_kind(cfg)
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
                loss = training_loss(model, kind, images.clone())  # the batch counts, as in the estimate
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


# -- report -----------------------------------------------------------------------------------------------
def settings_of(cfg: DictConfig) -> dict[str, Any]:
    if cfg.dtype not in DTYPES:
        raise ConfigError(f"dtype: expected one of {list(DTYPES)}, got {cfg.dtype!r}")
    if int(cfg.devices) < 1:
        raise ConfigError(f"devices: expected a positive number of GPUs, got {cfg.devices}")
    batch = cfg.batch_size
    if batch is None:
        batch = ((cfg.task.get("data") or {}).get("batch_size")) or 1
    if int(batch) < 1:
        raise ConfigError(f"batch_size: expected at least 1 image per GPU, got {batch}")
    return {"batch_size": int(batch), "devices": int(cfg.devices), "dtype": cfg.dtype}


def estimate(cfg: DictConfig) -> dict[str, Any]:
    """Everything the table prints, as plain data (bytes unless named otherwise)."""
    settings = settings_of(cfg)
    backbone = backbone_dict(cfg)
    kind = task_kind(cfg)
    start = time.perf_counter()
    model = build_model(cfg, backbone).train()
    params = parameter_counts(model, keeps_ema(cfg))
    if cfg.get("validate") and params["total"] > MAX_VALIDATE_PARAMS:
        raise ConfigError(
            f"validate=true builds {cfg.model.name} ({params['total'] / 1e6:.0f}M parameters) for real on "
            f"the CPU; it is meant for small models (at most {MAX_VALIDATE_PARAMS / 1e6:.0f}M)"
        )
    built = time.perf_counter() - start
    size = training_input(cfg, backbone["resolutions"], settings["batch_size"])
    bf16 = settings["dtype"] == "bf16"
    mode = FakeTensorMode()
    to_fake(model, mode)
    with mode:
        acts = activation_figures(model, kind, size, bf16)
    state = state_figures(params, settings["devices"], bf16)
    checkpointing = cfg.get("grad_checkpointing")
    report = {
        "model": cfg.model.name,
        "task": cfg.task.name,
        "kind": kind,
        "resolutions": list(backbone["resolutions"]),
        "input_size": list(size),
        "heads": SCOPES[head_scope(model, kind)],
        "settings": settings,
        "params": params,
        "state": state,
        "activations": acts,
        "totals": totals(state, acts, settings["batch_size"], 2 * params["autocast"] if bf16 else 0),
        "seconds": {"build": built, "total": time.perf_counter() - start},
    }
    if checkpointing is not None:  # only the asked setting (an experiment's grad_checkpointing, say)
        report["totals"].pop("plain" if checkpointing else "checkpointing")
    if cfg.get("validate"):
        report["measured"] = measure_real(cfg, backbone, size, settings["batch_size"], bf16)
    return report


def _gib(value: float) -> str:
    return f"{value / GIB:.1f}"


def _size(value: float) -> str:
    """GiB, or MiB below one GiB (small models would read 0.0)."""
    return f"{value / GIB:.1f} GiB" if value >= GIB else f"{value / 2**20:.0f} MiB"


def caption(report: dict[str, Any]) -> str:
    s = report["settings"]
    height, width = report["input_size"]
    return (
        f"{report['model']} · task {report['task']} · {s['dtype']} training, AdamW · "
        f"{s['batch_size']} image(s) per GPU at {height}x{width} · FSDP over {s['devices']} GPUs · "
        f"estimated on fake tensors ({report['heads']}) · per GPU, without CUDA context/fragmentation"
    )


def print_table(report: dict[str, Any]) -> None:
    table = Table(title=caption(report))
    columns = [
        "checkpointing",
        "params (M)",
        "trainable (M)",
        "state DDP",
        "state FSDP",
        "act./image",
        "total DDP",
        "total FSDP",
    ]
    for column in columns:
        table.add_column(column, justify="left" if column == "checkpointing" else "right")
    params, state = report["params"], report["state"]
    for name, figures in report["totals"].items():
        table.add_row(
            "on" if name == "checkpointing" else "off",
            f"{params['total'] / 1e6:.1f}",
            f"{params['trainable'] / 1e6:.1f}",
            _size(state["ddp"]),
            _size(state["fsdp"]),
            _size(figures["activations_per_image"]),
            _size(figures["ddp"]),
            _size(figures["fsdp"]),
        )
    console = Console()
    if not console.is_terminal:  # redirected to a file or a log: do not squeeze the table to 80 columns
        console = Console(width=160)
    console.print(table)
    for name, m in report.get("measured", {}).items():
        setting = "on" if name == "checkpointing" else "off"
        console.print(
            f"measured with real tensors on the CPU, checkpointing {setting}: saved for backward "
            f"{m['saved'] / 2**20:.1f} MiB, peak of live tensors in forward + backward "
            f"{m['peak_forward_backward'] / 2**20:.1f} MiB (gradients {m['gradients'] / 2**20:.1f} MiB)"
        )


MARKDOWN_HEADER = (
    "| model | resolutions | input (per GPU) | params (M) | act./image | DDP | FSDP "
    "| act./image (GC) | DDP (GC) | FSDP (GC) |\n|---|---|---|---:|---:|---:|---:|---:|---:|---:|"
)


def markdown_row(report: dict[str, Any]) -> str:
    t = report["totals"]
    cells = [
        report["model"],
        "/".join(map(str, report["resolutions"])),
        f"{report['settings']['batch_size']} x {report['input_size'][0]}x{report['input_size'][1]}",
        f"{report['params']['total'] / 1e6:.0f}",
    ]
    for name in ("plain", "checkpointing"):
        figures = t.get(name)
        cells += (
            [_gib(figures[k]) for k in ("activations_per_image", "ddp", "fsdp")] if figures else ["-"] * 3
        )
    return "| " + " | ".join(cells) + " |"


@hydra.main(config_path=str(CONF_DIR), config_name="memory", version_base="1.3")
def main(cfg: DictConfig) -> None:
    configure_cpu_math()  # validate=true runs real CPU steps: no subnormal slowdown
    report = estimate(cfg)
    if cfg.output:
        write_json(Path(cfg.output), report)
    if cfg.format == "json":
        print(json.dumps(report))
    elif cfg.format == "markdown":
        print(MARKDOWN_HEADER)
        print(markdown_row(report))
    else:
        print_table(report)


if __name__ == "__main__":
    quote_resolution_overrides()
    main()
