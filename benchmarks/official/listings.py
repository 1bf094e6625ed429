"""Key -> shape listing of every released PIIP config, as its official checkpoint holds it.

The backbone part comes from the official backbone class itself, built on the meta device with the config's
own `model.backbone` kwargs (no weights are allocated or loaded). The detection and segmentation heads are
mmdet 2.x / mmseg 0.x modules that cannot be imported without mmcv's compiled ops; their keys follow from
the config (`neck`, `rpn_head`, `roi_head`, `bbox_head`, `decode_head`, `auxiliary_head`) by those
libraries' naming, written out below (Mask R-CNN, DINO, UperNet).
"""

from __future__ import annotations

import contextlib
import gzip
import json
import runpy
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from official_imports import load, sequential_downsampling  # noqa: E402

# Released configs per code base (PAPER.md §3.3-3.5)
CONFIG_GLOBS = {
    "classification": ["classification/configs/piip_*.py"],
    "mmdetection": [
        "mmdetection/configs/piip/[234]branch/mask_rcnn_*.py",
        "mmdetection/configs/piip/[234]branch/dino_4scale_*.py",  # is_dino=True backbones, DINO heads
        "mmdetection/configs/piip/convnext/*.py",
        "mmdetection/configs/piip/baseline/*.py",  # single-branch ViT-B/L, InternViT-6B, ConvNeXt-B
    ],
    "mmsegmentation": [
        "mmsegmentation/configs/piip/2branch/upernet_*.py",
        "mmsegmentation/configs/piip/baseline/upernet_*.py",
    ],
}
# Hugging Face ConvNeXt architectures the ConvNeXt configs name (from each model's config.json)
CONVNEXT_SIZES = {
    "convnext-tiny": ([96, 192, 384, 768], [3, 3, 9, 3]),
    "convnext-small": ([96, 192, 384, 768], [3, 3, 27, 3]),
    "convnext-base": ([128, 256, 512, 1024], [3, 3, 27, 3]),
    "convnext-large": ([192, 384, 768, 1536], [3, 3, 27, 3]),
}
CLASSES = {"mmdetection": 80, "mmsegmentation": 150}


def read_config(path: Path) -> dict:
    """An mmcv-style config file's `model` dict (the PIIP configs set every backbone field themselves)."""
    return runpy.run_path(str(path))["model"]


def _shapes(module: torch.nn.Module, prefix: str = "") -> dict[str, list[int]]:
    return {prefix + k: list(v.shape) for k, v in module.state_dict().items()}


def _no_downloads(modules: dict) -> None:
    """`ConvNextModel.from_pretrained("facebook/convnext-small-224")` -> the same architecture, unloaded."""
    wrapper = vars(modules["piip_3branch"]).get("ConvNextHFWrapper")
    if wrapper is None:
        return
    from transformers import ConvNextConfig, ConvNextModel

    module = sys.modules[wrapper.__module__]

    class Offline:  # noqa: D101 - a loader shim only
        @staticmethod
        def from_pretrained(name: str, **kwargs):
            size = next(k for k in CONVNEXT_SIZES if k in name)
            hidden, depths = CONVNEXT_SIZES[size]
            return sequential_downsampling(
                ConvNextModel(ConvNextConfig(hidden_sizes=hidden, depths=depths, **kwargs))
            )

    module.ConvNextModel = Offline


def backbone_kwargs(model: dict, code_base: str) -> tuple[str, dict]:
    kwargs = dict(model["backbone"])
    kwargs.pop("_delete_", None)
    kind = kwargs.pop("type", None)
    branches = sorted(k for k in kwargs if k.startswith("branch") and k[6:].isdigit())
    for name in branches:
        kwargs[name] = _runnable_on_cpu(dict(kwargs[name]))
    if not branches:  # a single-branch baseline: the branch class itself
        kwargs = _runnable_on_cpu(kwargs)
    if code_base == "classification":
        kind = {2: "PIIPTwoBranch", 3: "PIIPThreeBranch", 4: "PIIPFourBranch"}[len(branches)]
        for name in branches:
            kwargs[name]["pretrained"] = None
    return kind, kwargs


def _runnable_on_cpu(branch: dict) -> dict:
    """A branch's kwargs without flash-attn: FusedMLP has the same fc1/fc2 keys and shapes as the MLP."""
    if branch.get("mlp_type") == "fused_mlp":
        branch["mlp_type"] = "regular"
    if branch.get("Mlp_block") == "fused_mlp":
        branch.pop("Mlp_block")  # vit_models' spelling of the same
    if "use_flash_attn" in branch:
        branch["use_flash_attn"] = False
    return branch


def official_class(modules: dict, kind: str) -> type:
    """The official class a config's `type` names, from the imported backbone modules."""
    for module in [*modules.values(), *(m for n, m in sys.modules.items() if n.startswith("official_"))]:
        if isinstance(getattr(module, kind, None), type):
            return getattr(module, kind)
    raise KeyError(f"no official backbone class {kind!r} among the imported modules")


def mmdet_heads(model: dict) -> dict[str, list[int]]:
    """mmdet 2.x FPN + RPNHead + StandardRoIHead (Shared2FCBBoxHead, FCNMaskHead) keys for these settings."""
    neck, classes = model.get("neck", {}), CLASSES["mmdetection"]
    ins, out = neck.get("in_channels", [256] * 4), neck.get("out_channels", 256)
    keys: dict[str, list[int]] = {}
    for i, c in enumerate(ins):
        keys |= {
            f"neck.lateral_convs.{i}.conv.weight": [out, c, 1, 1],
            f"neck.lateral_convs.{i}.conv.bias": [out],
        }
        keys |= {f"neck.fpn_convs.{i}.conv.weight": [out, out, 3, 3], f"neck.fpn_convs.{i}.conv.bias": [out]}
    anchors = 3  # one scale, ratios 0.5/1/2
    keys |= {"rpn_head.rpn_conv.weight": [out, out, 3, 3], "rpn_head.rpn_conv.bias": [out]}
    keys |= {"rpn_head.rpn_cls.weight": [anchors, out, 1, 1], "rpn_head.rpn_cls.bias": [anchors]}
    keys |= {"rpn_head.rpn_reg.weight": [anchors * 4, out, 1, 1], "rpn_head.rpn_reg.bias": [anchors * 4]}
    box = "roi_head.bbox_head."
    keys |= {box + "shared_fcs.0.weight": [1024, out * 49], box + "shared_fcs.0.bias": [1024]}
    keys |= {box + "shared_fcs.1.weight": [1024, 1024], box + "shared_fcs.1.bias": [1024]}
    keys |= {box + "fc_cls.weight": [classes + 1, 1024], box + "fc_cls.bias": [classes + 1]}
    keys |= {box + "fc_reg.weight": [classes * 4, 1024], box + "fc_reg.bias": [classes * 4]}
    mask = "roi_head.mask_head."
    for i in range(4):
        keys |= {mask + f"convs.{i}.conv.weight": [256, 256, 3, 3], mask + f"convs.{i}.conv.bias": [256]}
    keys |= {mask + "upsample.weight": [256, 256, 2, 2], mask + "upsample.bias": [256]}
    keys |= {mask + "conv_logits.weight": [classes, 256, 1, 1], mask + "conv_logits.bias": [classes]}
    return keys


def _linear(prefix: str, out: int, inp: int) -> dict[str, list[int]]:
    return {prefix + "weight": [out, inp], prefix + "bias": [out]}


def _norm(prefix: str, channels: int) -> dict[str, list[int]]:
    return {prefix + "weight": [channels], prefix + "bias": [channels]}


def _deformable(
    prefix: str, dim: int, heads: int = 8, levels: int = 4, points: int = 4
) -> dict[str, list[int]]:
    """mmcv MultiScaleDeformableAttention (its defaults: 8 heads, 4 levels, 4 points)."""
    keys = _linear(prefix + "sampling_offsets.", heads * levels * points * 2, dim)
    keys |= _linear(prefix + "attention_weights.", heads * levels * points, dim)
    return keys | _linear(prefix + "value_proj.", dim, dim) | _linear(prefix + "output_proj.", dim, dim)


def _ffn(prefix: str, dim: int, hidden: int) -> dict[str, list[int]]:
    """mmcv FFN, 2 fcs: layers = Sequential(Sequential(Linear, act, Dropout), Linear, Dropout)."""
    return _linear(prefix + "layers.0.0.", hidden, dim) | _linear(prefix + "layers.1.", dim, hidden)


def mmdet_dino_heads(model: dict) -> dict[str, list[int]]:
    """mmdet 2.x ChannelMapper (GN, so conv without bias) + DINOHead (two-stage, box refinement: one cls/reg
    branch per decoder layer + one for the encoder proposals) + DinoTransformer keys for these settings."""
    neck, head, classes = model["neck"], model["bbox_head"], CLASSES["mmdetection"]
    out, size = neck["out_channels"], neck.get("kernel_size", 3)
    keys: dict[str, list[int]] = {}
    for i, c in enumerate(neck["in_channels"]):
        keys |= {f"neck.convs.{i}.conv.weight": [out, c, size, size]} | _norm(f"neck.convs.{i}.gn.", out)
    for i in range(
        neck["num_outs"] - len(neck["in_channels"])
    ):  # stride-2 3x3 convs, the first on the last map
        inp = neck["in_channels"][-1] if i == 0 else out
        keys |= {f"neck.extra_convs.{i}.conv.weight": [out, inp, 3, 3]} | _norm(
            f"neck.extra_convs.{i}.gn.", out
        )
    transformer = head["transformer"]
    encoder, decoder = transformer["encoder"], transformer["decoder"]
    dim = encoder["transformerlayers"]["attn_cfgs"]["embed_dims"]
    ffn = encoder["transformerlayers"]["feedforward_channels"]
    box = "bbox_head."
    for i in range(decoder["num_layers"] + 1):
        keys |= _linear(f"{box}cls_branches.{i}.", classes, dim)
        for j, width in ((0, dim), (2, dim), (4, 4)):  # Linear, ReLU, Linear, ReLU, Linear
            keys |= _linear(f"{box}reg_branches.{i}.{j}.", width, dim)
    keys[box + "label_embedding.weight"] = [classes, dim]
    net = box + "transformer."
    keys[net + "level_embeds"] = [transformer.get("num_feature_levels", 4), dim]
    keys |= _linear(net + "enc_output.", dim, dim) | _norm(net + "enc_output_norm.", dim)
    keys[net + "query_embed.weight"] = [transformer["two_stage_num_proposals"], dim]
    for i in range(encoder["num_layers"]):
        layer = f"{net}encoder.layers.{i}."
        keys |= _deformable(layer + "attentions.0.", dim) | _ffn(layer + "ffns.0.", dim, ffn)
        keys |= _norm(layer + "norms.0.", dim) | _norm(layer + "norms.1.", dim)
    for i in range(decoder["num_layers"]):
        layer = f"{net}decoder.layers.{i}."
        attn = layer + "attentions.0.attn."  # mmcv MultiheadAttention around torch's
        keys |= {attn + "in_proj_weight": [3 * dim, dim], attn + "in_proj_bias": [3 * dim]}
        keys |= _linear(attn + "out_proj.", dim, dim)
        keys |= _deformable(layer + "attentions.1.", dim) | _ffn(layer + "ffns.0.", dim, ffn)
        keys |= {k: v for n in range(3) for k, v in _norm(f"{layer}norms.{n}.", dim).items()}
    # build_MLP(2 dim, dim, dim, 2) is an nn.Sequential: Linear, ReLU, Linear
    keys |= _linear(net + "decoder.ref_point_head.0.", dim, 2 * dim)
    keys |= _linear(net + "decoder.ref_point_head.2.", dim, dim)
    return keys | _norm(net + "decoder.norm.", dim)


def _conv_bn(prefix: str, out: int, inp: int, k: int) -> dict[str, list[int]]:
    keys = {prefix + "conv.weight": [out, inp, k, k]}
    for name in ("weight", "bias", "running_mean", "running_var"):
        keys[prefix + "bn." + name] = [out]
    keys[prefix + "bn.num_batches_tracked"] = []
    return keys


def mmseg_heads(model: dict) -> dict[str, list[int]]:
    """mmseg UPerHead + FCNHead (one conv, no concat) keys for these settings."""
    decode, aux, classes = model["decode_head"], model["auxiliary_head"], CLASSES["mmsegmentation"]
    ins, c, scales = decode["in_channels"], decode["channels"], decode.get("pool_scales", (1, 2, 3, 6))
    keys: dict[str, list[int]] = {
        "decode_head.conv_seg.weight": [classes, c, 1, 1],
        "decode_head.conv_seg.bias": [classes],
    }
    for i, _ in enumerate(scales):
        keys |= _conv_bn(f"decode_head.psp_modules.{i}.1.", c, ins[-1], 1)
    keys |= _conv_bn("decode_head.bottleneck.", c, ins[-1] + len(scales) * c, 3)
    for i, channels in enumerate(ins[:-1]):
        keys |= _conv_bn(f"decode_head.lateral_convs.{i}.", c, channels, 1)
        keys |= _conv_bn(f"decode_head.fpn_convs.{i}.", c, c, 3)
    keys |= _conv_bn("decode_head.fpn_bottleneck.", c, len(ins) * c, 3)
    keys |= _conv_bn("auxiliary_head.convs.0.", aux["channels"], aux["in_channels"], 3)
    keys |= {"auxiliary_head.conv_seg.weight": [classes, aux["channels"], 1, 1]}
    keys |= {"auxiliary_head.conv_seg.bias": [classes]}
    return keys


@contextlib.contextmanager
def parameters_on_meta():
    """Every parameter and buffer is moved to the meta device as it is registered (6B models list in
    seconds); plain tensors the constructors compute (drop-path schedules) stay real."""
    register_parameter, register_buffer = torch.nn.Module.register_parameter, torch.nn.Module.register_buffer

    def parameter(self, name, param):
        if param is not None:
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register_parameter(self, name, param)

    def buffer(self, name, tensor, persistent=True):
        register_buffer(self, name, None if tensor is None else tensor.to("meta"), persistent)

    torch.nn.Module.register_parameter, torch.nn.Module.register_buffer = parameter, buffer
    try:
        yield
    finally:
        torch.nn.Module.register_parameter, torch.nn.Module.register_buffer = (
            register_parameter,
            register_buffer,
        )


def listing(modules: dict, path: Path, code_base: str) -> dict[str, list[int]]:
    model = read_config(path)
    kind, kwargs = backbone_kwargs(model, code_base)
    with parameters_on_meta():
        backbone = official_class(modules, kind)(**kwargs)
    if code_base == "classification":
        return _shapes(backbone)
    keys = _shapes(backbone, "backbone.")
    if code_base == "mmsegmentation":
        return keys | mmseg_heads(model)
    return keys | (mmdet_dino_heads(model) if model.get("type") == "DINO" else mmdet_heads(model))


def write_listings(official: Path, code_base: str, out: Path) -> None:
    if code_base not in CONFIG_GLOBS:
        return
    official = Path(official).resolve()
    modules = load(official, code_base)
    _no_downloads(modules)
    out.mkdir(parents=True, exist_ok=True)
    for pattern in CONFIG_GLOBS[code_base]:
        for path in sorted(official.glob(pattern)):
            keys = listing(modules, path, code_base)
            record = {"config": str(path.relative_to(official)), "keys": keys}
            text = json.dumps(record, indent=0, sort_keys=True) + "\n"
            # gzip: ~2,000 keys a config; mtime=0 keeps the file byte-identical between runs
            (out / f"{path.stem}.json.gz").write_bytes(gzip.compress(text.encode(), mtime=0))
            print(f"{path.stem}: {len(keys)} keys")
