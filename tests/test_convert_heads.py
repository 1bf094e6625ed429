"""mmdet Mask R-CNN and mmseg UperNet/FCN head checkpoints -> piip's heads (`piip.models.convert`).

The foreign state dicts are built here from mmdet's / mmseg's layouts (names and shapes of
`mask_rcnn_r50_fpn` and `upernet_r50`) with random values; after conversion they must load strictly into
piip's heads, and piip's heads must compute what mmdet's / mmseg's layers compute with those tensors.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from piip.errors import CheckpointError
from piip.models import PIIPBackbone
from piip.models.convert.mmdet_rcnn import background_last, convert_mask_rcnn
from piip.models.convert.mmseg_upernet import convert_upernet
from piip.models.heads.mask_rcnn import MaskRCNN, MaskRCNNConfig
from piip.models.heads.upernet import FCNHead, UperNetHead
from tests.conftest import make_piip_config, make_vit_spec

K, C, D, M, A = 3, 16, 32, 8, 3  # classes, FPN channels, box FC width, mask channels, anchors per cell
Tensors = dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def detector() -> MaskRCNN:
    torch.manual_seed(0)
    spec = make_vit_spec(dim=32)
    backbone = PIIPBackbone(make_piip_config([spec], [64], head="pyramid", merge="simple_fpn"))
    config = MaskRCNNConfig(fpn_channels=C, size_divisible=64, box_head_dim=D, mask_head_channels=M)
    return MaskRCNN(backbone, K, config).eval()


def mmdet_state(in_channels: list[int]) -> Tensors:
    """mmdet 2.x `mask_rcnn_r50_fpn` head tensors (random values) for K classes."""
    shapes = {}
    for i, channels in enumerate(in_channels):
        shapes[f"neck.lateral_convs.{i}.conv"] = (C, channels, 1, 1)
        shapes[f"neck.fpn_convs.{i}.conv"] = (C, C, 3, 3)
    shapes |= {"rpn_head.rpn_conv": (C, C, 3, 3), "rpn_head.rpn_cls": (A, C, 1, 1),
               "rpn_head.rpn_reg": (4 * A, C, 1, 1), "roi_head.bbox_head.shared_fcs.0": (D, C * 49),
               "roi_head.bbox_head.shared_fcs.1": (D, D), "roi_head.bbox_head.fc_cls": (K + 1, D),
               "roi_head.bbox_head.fc_reg": (4 * K, D), "roi_head.mask_head.upsample": (M, M, 2, 2),
               "roi_head.mask_head.conv_logits": (K, M, 1, 1)}  # fmt: skip
    for i in range(4):
        shapes[f"roi_head.mask_head.convs.{i}.conv"] = (M, C if i == 0 else M, 3, 3)
    state = {f"{name}.weight": torch.randn(shape) * 0.2 for name, shape in shapes.items()}
    biases = {name: shape[1] if name.endswith("upsample") else shape[0] for name, shape in shapes.items()}
    return state | {f"{name}.bias": torch.randn(rows) * 0.2 for name, rows in biases.items()}


def load_converted(module: nn.Module, converted: Tensors, prefix: str = "") -> None:
    module.load_state_dict({k.removeprefix(prefix): v for k, v in converted.items()}, strict=True)


def test_mmdet_heads_convert_to_exactly_the_detector_keys_and_load_strictly(detector):
    state = mmdet_state(detector.backbone.pyramid.out_channels)
    extra = {
        "backbone.patch_embed.proj.weight": torch.zeros(1),
        "roi_head.bbox_head.fc_x.weight": torch.zeros(1),
    }
    converted, unplaced = convert_mask_rcnn(state | extra)
    assert set(converted) == {f"detector.{key}" for key in detector.state_dict()}
    assert sorted(unplaced) == sorted(extra)  # nothing dropped silently
    assert detector.from_official(state)[0].keys() == converted.keys()  # the task's conversion hook
    load_converted(detector, converted, "detector.")
    for layer, piip, rows, background in [
        ("fc_cls", "cls_score", 1, True),
        ("fc_reg", "bbox_pred", 4, False),
    ]:
        ours = converted[f"detector.roi_heads.box_predictor.{piip}.weight"]
        assert torch.equal(
            background_last(ours, rows, background), state[f"roi_head.bbox_head.{layer}.weight"]
        )
    wrong = state | {"roi_head.bbox_head.fc_reg.weight": torch.zeros(4, D)}  # class-agnostic boxes
    with pytest.raises(CheckpointError, match=r"fc_reg.weight: expected 12 rows"):
        convert_mask_rcnn(wrong)


def test_the_converted_detector_computes_mmdets_outputs_in_its_own_class_order(detector):
    torch.manual_seed(1)
    s = mmdet_state(detector.backbone.pyramid.out_channels)
    load_converted(detector, convert_mask_rcnn(s)[0], "detector.")

    def layer(x: torch.Tensor, name: str, op=F.conv2d, **kwargs) -> torch.Tensor:
        return op(x, s[f"{name}.weight"], s[f"{name}.bias"], **kwargs)

    # FPN: 1x1 laterals, nearest top-down sums, 3x3 outputs, a stride-2 max-pool of the coarsest
    sizes = [16, 8, 4, 2]
    pyramid = [
        torch.randn(1, c, n, n) for c, n in zip(detector.backbone.pyramid.out_channels, sizes, strict=True)
    ]
    laterals = [layer(x, f"neck.lateral_convs.{i}.conv") for i, x in enumerate(pyramid)]
    for i in range(3, 0, -1):
        laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=sizes[i - 1], mode="nearest")
    outs = [layer(x, f"neck.fpn_convs.{i}.conv", padding=1) for i, x in enumerate(laterals)]
    outs.append(F.max_pool2d(outs[-1], 1, stride=2))
    rois, masks_in = torch.randn(5, C, 7, 7), torch.randn(2, C, 14, 14)
    with torch.no_grad():
        for ours, theirs in zip(detector.neck(pyramid).values(), outs, strict=True):
            torch.testing.assert_close(ours, theirs)
        # RPN head: 3x3 conv + ReLU, 1x1 objectness (sigmoid, one per anchor) and deltas
        hidden = F.relu(layer(outs[0], "rpn_head.rpn_conv", padding=1))
        (objectness,), (deltas,) = detector.rpn.head([outs[0]])
        torch.testing.assert_close(objectness, layer(hidden, "rpn_head.rpn_cls"))
        torch.testing.assert_close(deltas, layer(hidden, "rpn_head.rpn_reg"))
        # box head: mmdet's scores (background last) and class-specific deltas (no background)
        x = F.relu(layer(rois.flatten(1), "roi_head.bbox_head.shared_fcs.0", F.linear))
        x = F.relu(layer(x, "roi_head.bbox_head.shared_fcs.1", F.linear))
        mm_scores = layer(x, "roi_head.bbox_head.fc_cls", F.linear)
        mm_deltas = layer(x, "roi_head.bbox_head.fc_reg", F.linear)
        scores, box_deltas = detector.roi_heads.box_predictor(detector.roi_heads.box_head(rois))
        torch.testing.assert_close(scores[:, 1:], mm_scores[:, :K])  # mmdet class k is piip label k + 1
        torch.testing.assert_close(scores[:, 0], mm_scores[:, K])  # background
        torch.testing.assert_close(scores.softmax(-1)[:, 1:], mm_scores.softmax(-1)[:, :K])
        torch.testing.assert_close(box_deltas.reshape(5, K + 1, 4)[:, 1:], mm_deltas.reshape(5, K, 4))
        # mask head: four 3x3 convs, 2x deconv, 1x1 logits per class (no background)
        y = masks_in
        for i in range(4):
            y = F.relu(layer(y, f"roi_head.mask_head.convs.{i}.conv", padding=1))
        y = F.relu(layer(y, "roi_head.mask_head.upsample", F.conv_transpose2d, stride=2))
        mm_masks = layer(y, "roi_head.mask_head.conv_logits")
        masks = detector.roi_heads.mask_predictor(detector.roi_heads.mask_head(masks_in))
        torch.testing.assert_close(masks[:, 1:], mm_masks)


# -- mmseg UperNet + FCN ---------------------------------------------------------------------------------
IN, CH, CLASSES, SCALES = [12, 12, 12, 12], 8, 5, (1, 2, 3, 6)


def conv_module(name: str, out_channels: int, in_channels: int, kernel: int) -> Tensors:
    """mmcv `ConvModule` with BN: a bias-free conv and its norm's parameters and statistics."""
    return {
        f"{name}.conv.weight": torch.randn(out_channels, in_channels, kernel, kernel) * 0.2,
        f"{name}.bn.weight": torch.rand(out_channels) + 0.5,
        f"{name}.bn.bias": torch.randn(out_channels) * 0.1,
        f"{name}.bn.running_mean": torch.randn(out_channels) * 0.1,
        f"{name}.bn.running_var": torch.rand(out_channels) + 0.5,
        f"{name}.bn.num_batches_tracked": torch.tensor(7),
    }


def mmseg_state() -> Tensors:
    """mmseg `UPerHead` + `FCNHead` (one conv, `concat_input=False`) tensors, random values."""
    state: Tensors = {}
    for i in range(len(SCALES)):
        state |= conv_module(f"decode_head.psp_modules.{i}.1", CH, IN[-1], 1)
    state |= conv_module("decode_head.bottleneck", CH, IN[-1] + len(SCALES) * CH, 3)
    for i in range(len(IN) - 1):
        state |= conv_module(f"decode_head.lateral_convs.{i}", CH, IN[i], 1)
        state |= conv_module(f"decode_head.fpn_convs.{i}", CH, CH, 3)
    state |= conv_module("decode_head.fpn_bottleneck", CH, len(IN) * CH, 3)
    state |= conv_module("auxiliary_head.convs.0", CH, IN[2], 3)
    for head in ("decode_head", "auxiliary_head"):
        state |= {
            f"{head}.conv_seg.weight": torch.randn(CLASSES, CH, 1, 1),
            f"{head}.conv_seg.bias": torch.randn(5),
        }
    return state


class SegHeads(nn.Module):
    """The segmentation task's head attributes (`decode_head`, `aux_head`), without the backbone."""

    def __init__(self) -> None:
        super().__init__()
        self.decode_head = UperNetHead(IN, CH, CLASSES, SCALES)
        self.aux_head = FCNHead(IN[2], CH, CLASSES)


def test_mmseg_heads_convert_to_exactly_the_task_keys_and_compute_mmsegs_logits():
    torch.manual_seed(0)
    s = mmseg_state()
    extra = {"backbone.w1": torch.zeros(1), "auxiliary_head.convs.1.conv.weight": torch.zeros(1)}
    converted, unplaced = convert_upernet(s | extra)
    heads = SegHeads().eval()
    assert set(converted) == set(heads.state_dict())
    assert sorted(unplaced) == sorted(extra)
    load_converted(heads, converted)

    def conv_module_forward(x: torch.Tensor, name: str) -> torch.Tensor:
        weight = s[f"{name}.conv.weight"]
        y = F.conv2d(x, weight, padding=weight.shape[-1] // 2)
        bn = [s[f"{name}.bn.{p}"] for p in ("running_mean", "running_var", "weight", "bias")]
        return F.relu(F.batch_norm(y, *bn, training=False))

    def resize(x: torch.Tensor, size: torch.Size) -> torch.Tensor:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    inputs = [torch.randn(2, c, 32 // 2**i, 32 // 2**i) for i, c in enumerate(IN)]
    top = inputs[-1]
    pooled = [conv_module_forward(F.adaptive_avg_pool2d(top, n), f"decode_head.psp_modules.{i}.1")
              for i, n in enumerate(SCALES)]  # fmt: skip
    psp = torch.cat([top, *[resize(p, top.shape[-2:]) for p in pooled]], dim=1)
    laterals = [conv_module_forward(x, f"decode_head.lateral_convs.{i}") for i, x in enumerate(inputs[:-1])]
    laterals.append(conv_module_forward(psp, "decode_head.bottleneck"))
    for i in range(len(laterals) - 1, 0, -1):
        laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[-2:])
    outs = [conv_module_forward(x, f"decode_head.fpn_convs.{i}") for i, x in enumerate(laterals[:-1])]
    outs = [*outs, laterals[-1]]
    fused = torch.cat([resize(x, outs[0].shape[-2:]) for x in outs], dim=1)
    features = conv_module_forward(fused, "decode_head.fpn_bottleneck")
    logits = F.conv2d(features, s["decode_head.conv_seg.weight"], s["decode_head.conv_seg.bias"])
    aux = conv_module_forward(inputs[2], "auxiliary_head.convs.0")
    aux_logits = F.conv2d(aux, s["auxiliary_head.conv_seg.weight"], s["auxiliary_head.conv_seg.bias"])
    with torch.no_grad():
        torch.testing.assert_close(heads.decode_head(inputs), logits)
        torch.testing.assert_close(heads.aux_head(inputs), aux_logits)
