"""Parameter and FLOP counting, in the paper's convention (1 multiply-accumulate = 1 FLOP).

Both counts run `torch.utils.flop_counter.FlopCounterMode` over a forward pass (on the meta device, so the
6B model costs no memory) and halve its figure to get multiply-accumulates.

* `actual`: every op as executed — attention matmuls included — plus a registered formula for
  `grid_sampler_2d` (bilinear: 4 multiply-adds per sampled value), which FlopCounterMode does not count.
* `paper`: the counting rules of the paper's scripts (mmcv's counter, PAPER.md §4.2): Linear/Conv MACs
  from FlopCounterMode; attention matmuls and the deformable sampling replaced by the analytic terms
  `2·n²·d` (global), `2·n·w²·d` (windowed) and `5·n_q·K·d` (deformable), with n the grid tokens; and the
  per-module extras mmcv adds on exact module types: 2·numel for affine nn.LayerNorm/GroupNorm, numel for
  ReLU and pooling, the bias of convolutions. RMSNorm, timm/ConvNeXt LayerNorm classes, GELU and softmax
  count zero, as upstream. The LLaVA script evaluates the deformable term of every interaction on the
  query grid of the *first* interaction (`deform_grid_of_first_interaction`, PAPER.md §4.2 and §7.4).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from piip.models.backbone.attention import GridAttention
from piip.models.backbone.convs import PatchUpsample, SameConv2d
from piip.models.backbone.deformable import DeformableAttention
from piip.models.backbone.interaction import CrossAttention

aten = torch.ops.aten
_ATTENTION_OPS = [
    aten.bmm,
    aten.baddbmm,
    aten._scaled_dot_product_efficient_attention,
    aten._scaled_dot_product_flash_attention,
    aten._scaled_dot_product_cudnn_attention,
]


@dataclass
class Complexity:
    params: int
    macs: int

    @property
    def params_m(self) -> float:
        return self.params / 1e6

    @property
    def gflops(self) -> float:
        return self.macs / 1e9


def _grid_sample_flops(input_shape, grid_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * 4 * int(torch.Size(out_shape).numel())  # 4 bilinear taps per sampled value, in FLOPs


def _zero_flops(*args, **kwargs) -> int:
    return 0


def _numel(t: torch.Tensor) -> int:
    return int(t.numel())


def paper_module_macs(
    module: nn.Module, inputs: tuple, output: object, deform_queries: int | None = None
) -> int:
    """What the paper's counter adds for one module call beyond Linear/Conv MACs."""
    kind = type(module)
    x = inputs[0] if inputs else None
    if kind in (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d, nn.SyncBatchNorm):
        affine = getattr(module, "elementwise_affine", getattr(module, "affine", False))
        return _numel(x) * (2 if affine else 1)
    if kind in (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d):
        return _numel(x)
    if kind in (nn.Conv2d, nn.ConvTranspose2d, PatchUpsample, SameConv2d) and module.bias is not None:
        return _numel(output)
    if isinstance(module, GridAttention):
        n = x.shape[1] * x.shape[2] if x.ndim == 4 else x.shape[1] - module.num_prefix_tokens
        span = module.window_size**2 if module.window_size else n
        return 2 * x.shape[0] * n * span * module.dim
    if isinstance(module, DeformableAttention):
        queries = deform_queries if deform_queries is not None else x.shape[0] * x.shape[1]
        return 5 * queries * module.dim * module.num_levels * module.num_points  # K = L x P samples
    if isinstance(module, CrossAttention):
        feat = inputs[2]
        return 2 * _numel(x) * feat.shape[1]
    return 0


@contextmanager
def _hooks(model: nn.Module, fn: Callable[[nn.Module, tuple, object], int]) -> Iterator[list[int]]:
    total = [0]
    handles = [
        m.register_forward_hook(lambda m, i, o: total.__setitem__(0, total[0] + fn(m, i, o)))
        for m in model.modules()
    ]
    try:
        yield total
    finally:
        for handle in handles:
            handle.remove()


def _first_interaction_rule(model: nn.Module) -> Callable[[nn.Module, tuple, object], int]:
    """Paper extras where each deformable attention counts the queries its role had in interaction 0."""
    roles = {
        m: re.sub(r"^interactions\.\d+\.", "", name)
        for name, m in model.named_modules()
        if isinstance(m, DeformableAttention)
    }
    first_queries: dict[str, int] = {}

    def rule(module: nn.Module, inputs: tuple, output: object) -> int:
        if module in roles:
            queries = first_queries.setdefault(roles[module], inputs[0].shape[0] * inputs[0].shape[1])
            return paper_module_macs(module, inputs, output, deform_queries=queries)
        return paper_module_macs(module, inputs, output)

    return rule


def count(
    model: nn.Module,
    images: torch.Tensor,
    protocol: str = "actual",
    deform_grid_of_first_interaction: bool = False,
) -> Complexity:
    """Trainable parameters and forward multiply-accumulates of `model(images)`."""
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if protocol == "actual":
        mapping = {aten.grid_sampler_2d: _grid_sample_flops}
        extra = lambda m, i, o: 0
    elif protocol == "paper":
        mapping = {op: _zero_flops for op in _ATTENTION_OPS}
        extra = _first_interaction_rule(model) if deform_grid_of_first_interaction else paper_module_macs
    else:
        raise ValueError(f"protocol: expected 'actual' or 'paper', got {protocol!r}")
    # no torch.no_grad(): FlopCounterMode's module tracker rejects views of parameters made under it
    with _hooks(model, extra) as added, FlopCounterMode(display=False, custom_mapping=mapping) as fc:
        model(images)
    return Complexity(params, fc.get_total_flops() // 2 + added[0])
