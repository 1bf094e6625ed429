"""Golden values of mmdet 2.x's Mask R-CNN formulas, computed by mmdet's own code from the official PIIP tree.

python benchmarks/official/mask_rcnn_parts.py /tmp/official tests/fixtures/official

Writes `mask_rcnn_parts.pt` (~100 KB) for `tests/test_official_mask_rcnn_parts.py`: anchors, box deltas
(RPN and RoI settings, clamped large deltas), RoI levels, IoUs and MaxIoUAssigner assignments, pasted masks,
RPN proposals (`RPNHead._get_bboxes_single`) and detections (`BBoxHead.get_bboxes` + `multiclass_nms`).
mmdet imports mmcv (compiled ops, registries, fp16 decorators) everywhere: the few names the loaded files
need are replaced by small stand-ins below, and only the files holding the formulas are loaded (from
`<official>/mmdetection`, and mmcv's `batched_nms` from `<official>/mmcv`). The one compiled op, NMS itself,
is torchvision's `nms`, whose CPU kernel is mmcv's line for line (IoU > threshold suppresses).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

SEED = 0


def identity_decorator(*args: Any, **kwargs: Any) -> Any:
    """`@force_fp32(...)`, `@mmcv.jit(...)`: leave the function as it is."""
    return lambda function: function


class Registry:
    """`@REGISTRY.register_module()`: register nothing."""

    def register_module(self, *args: Any, **kwargs: Any) -> Any:
        return lambda cls: cls


class BaseModule(nn.Module):
    def __init__(self, init_cfg: Any = None) -> None:
        super().__init__()


class Config(dict):
    """mmcv's `ConfigDict`: a dict whose keys read as attributes."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError as error:
            raise AttributeError(name) from error


def stub(name: str, **attributes: Any) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__path__ = []  # a package, so relative imports below it resolve through sys.modules
    module.__dict__.update(attributes)
    sys.modules[name] = module
    return module


def install_stubs() -> None:
    placeholder = object()
    stub("mmcv", jit=identity_decorator, is_tuple_of=lambda *a, **k: True)
    stub("mmcv.runner", force_fp32=identity_decorator, auto_fp16=identity_decorator, BaseModule=BaseModule,
         ModuleList=nn.ModuleList)  # fmt: skip
    stub("mmcv.ops", carafe=None)
    stub("mmcv.ops.carafe", CARAFEPack=placeholder)
    stub("mmcv.cnn", ConvModule=placeholder, build_conv_layer=placeholder, build_upsample_layer=placeholder)
    for package in ("mmdet", "mmdet.core", "mmdet.core.anchor", "mmdet.core.bbox", "mmdet.core.bbox.coder",
                    "mmdet.core.bbox.assigners", "mmdet.core.bbox.iou_calculators", "mmdet.models",
                    "mmdet.models.roi_heads", "mmdet.models.roi_heads.roi_extractors",
                    "mmdet.models.roi_heads.mask_heads", "mmdet.utils"):  # fmt: skip
        stub(package)
    sys.modules["mmdet.core"].mask_target = placeholder
    for builder in ("mmdet.core.anchor.builder", "mmdet.core.bbox.builder",
                    "mmdet.core.bbox.iou_calculators.builder"):  # fmt: skip
        stub(builder, PRIOR_GENERATORS=Registry(), BBOX_CODERS=Registry(), BBOX_ASSIGNERS=Registry(),
             IOU_CALCULATORS=Registry())  # fmt: skip
    stub("mmdet.models.builder", ROI_EXTRACTORS=Registry(), HEADS=Registry(), build_loss=placeholder)
    stub("mmdet.utils.util_mixins", NiceRepr=object)
    sys.modules["mmdet.utils"].util_mixins = sys.modules["mmdet.utils.util_mixins"]
    compiled = types.SimpleNamespace(nms=lambda boxes, scores, iou_threshold, offset: torchvision.ops.nms(
        boxes, scores, iou_threshold))  # fmt: skip
    stub("mmcv.utils", deprecated_api_warning=identity_decorator,
         ext_loader=types.SimpleNamespace(load_ext=lambda *args: compiled))  # fmt: skip
    for package in (
        "mmdet.core.post_processing",
        "mmdet.models.dense_heads",
        "mmdet.models.roi_heads.bbox_heads",
    ):
        stub(package)
    stub("mmdet.models.dense_heads.anchor_head", AnchorHead=nn.Module)
    stub("mmdet.models.losses", accuracy=placeholder)
    stub("mmdet.models.utils", build_linear_layer=placeholder)
    sys.modules["mmdet.core"].__dict__.update(build_bbox_coder=placeholder, multi_apply=placeholder)
    sys.modules["mmdet.core.bbox.iou_calculators"].bbox_overlaps = placeholder


def load(root: Path, name: str) -> types.ModuleType:
    """Execute one mmdet (or mmcv) source file as module `name` (its package is a stand-in)."""
    project = "mmcv" if name.startswith("mmcv") else "mmdetection"
    path = root / project / (name.replace(".", "/") + ".py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def assign_result(num_gts: int, gt_inds: torch.Tensor, max_overlaps: torch.Tensor, labels: Any = None) -> Any:
    """mmdet's `AssignResult`, reduced to the gt per box (1-based; 0 negative, -1 ignored)."""
    return types.SimpleNamespace(gt_inds=gt_inds)


def anchors(anchor_generator: types.ModuleType) -> list[dict]:
    sizes = [(7, 5), (4, 3), (2, 2), (1, 1), (1, 1)]
    cases = []
    for scale in (8, 2, 3):  # the released configs, the shapes quick start, an octave scale off 2^k
        generator = anchor_generator.AnchorGenerator(
            strides=[4, 8, 16, 32, 64], ratios=[0.5, 1.0, 2.0], scales=[scale]
        )
        priors = generator.grid_priors(sizes, device="cpu")
        flags = generator.valid_flags(sizes, (20, 9), device="cpu")
        cases.append({"scale": scale, "featmap_sizes": sizes, "anchors": priors, "pad_shape": (20, 9),
                      "valid_flags": flags})  # fmt: skip
    return cases


def random_boxes(generator: torch.Generator, count: int, extent: float) -> torch.Tensor:
    corner = torch.rand(count, 2, generator=generator) * extent
    size = torch.rand(count, 2, generator=generator) * extent / 2 + 1
    return torch.cat([corner, corner + size], dim=1)


def coder(coder_module: types.ModuleType, generator: torch.Generator) -> list[dict]:
    proposals = random_boxes(generator, 32, 200.0)
    gt = random_boxes(generator, 32, 200.0)
    deltas = torch.randn(32, 4, generator=generator)
    large = [[8.0, -9.0], [-6.0, 5.0], [12.0, 12.0], [-12.0, -12.0], [4.2, -4.2], [3.0, 3.0]]
    deltas[: len(large), 2:] = torch.tensor(large)  # beyond +-log(1000 / 16): clamped
    multi = torch.randn(32, 12, generator=generator) * 2  # class-specific deltas, 3 classes
    cases = []
    for stds in ((1.0, 1.0, 1.0, 1.0), (0.1, 0.1, 0.2, 0.2)):
        box_coder = coder_module.DeltaXYWHBBoxCoder(target_means=(0.0,) * 4, target_stds=stds)
        cases.append({
            "stds": stds, "proposals": proposals, "gt": gt, "encoded": box_coder.encode(proposals, gt),
            "deltas": deltas, "max_shape": (180, 230),
            "decoded": box_coder.decode(proposals, deltas, max_shape=(180, 230)),
            "decoded_unclipped": box_coder.decode(proposals, deltas),
            "multi_deltas": multi, "multi_decoded": box_coder.decode(proposals, multi, max_shape=(180, 230)),
        })  # fmt: skip
    return cases


def levels(extractor: types.ModuleType, generator: torch.Generator) -> dict:
    sides = [1.0, 55.9, 56.0, 111.9, 111.99994, 112.0, 112.00001, 223.99, 224.0, 447.99, 448.0, 895.9, 2000]
    squares = torch.tensor([[10.0, 20.0, 10.0 + s, 20.0 + s] for s in sides])
    rectangles = random_boxes(generator, 40, 900.0)
    boxes = torch.cat([squares, rectangles])
    rois = torch.cat([torch.zeros(len(boxes), 1), boxes], dim=1)
    fake = types.SimpleNamespace(finest_scale=56)  # map_roi_levels reads only this attribute
    return {"boxes": boxes, "levels": extractor.SingleRoIExtractor.map_roi_levels(fake, rois, 4)}


def assignments(iou_module: types.ModuleType, assigner_module: types.ModuleType, g: torch.Generator) -> list:
    gt = torch.tensor([[10.0, 10.0, 60.0, 60.0], [40.0, 40.0, 90.0, 90.0], [10.0, 10.0, 60.0, 60.0],
                       [150.0, 150.0, 152.0, 153.0]])  # fmt: skip
    boxes = torch.cat([random_boxes(g, 60, 120.0), gt[:2] + 3.0, gt[:2] + 3.0, gt[3:] + 1.5])
    boxes = torch.cat([boxes, torch.tensor([[5.0, 5.0, 5.0, 9.0]])])  # a degenerate box
    overlaps = iou_module.bbox_overlaps(gt, boxes)
    cases = []
    for pos, neg, min_pos in ((0.7, 0.3, 0.3), (0.5, 0.5, 0.5)):
        fake = types.SimpleNamespace(pos_iou_thr=pos, neg_iou_thr=neg, min_pos_iou=min_pos,
                                     gt_max_assign_all=True, match_low_quality=True)  # fmt: skip
        result = assigner_module.MaxIoUAssigner.assign_wrt_overlaps(fake, overlaps)
        cases.append({"thresholds": (pos, neg, min_pos), "gt_inds": result.gt_inds})
    return [{"gt": gt, "boxes": boxes, "iou": overlaps, "cases": cases}]


def pasted(mask_head: types.ModuleType, generator: torch.Generator) -> dict:
    masks = torch.rand(6, 1, 28, 28, generator=generator).half().float()
    masks[0] = 1.0  # saturated, and pixel centres on its box's border: pasted values of exactly one half
    boxes = torch.tensor([[3.5, 4.5, 30.5, 25.5], [0.0, 0.0, 50.0, 40.0], [10.5, 10.5, 11.5, 30.0],
                          [20.0, 5.0, 20.0, 9.0], [45.3, 30.1, 49.99, 39.7],
                          [7.2, 2.7, 41.1, 38.9]])  # fmt: skip
    full, _ = mask_head._do_paste_mask(masks, boxes, 40, 50, skip_empty=False)
    return {"masks": masks.half(), "boxes": boxes, "size": (40, 50), "binary": full >= 0.5}


def halves(*shape: int, generator: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    """Random values that float16 stores exactly (the fixture keeps inputs in float16)."""
    return (torch.randn(*shape, generator=generator) * scale).half().float()


def proposals(rpn_head: types.ModuleType, coder_module: types.ModuleType, generator: torch.Generator) -> dict:
    """mmdet's test-time RPN on random outputs for a 64 x 80 batch holding a 60 x 75 image."""
    sizes = [(16, 20), (8, 10), (4, 5), (2, 3), (1, 2)]
    scores = [halves(3, h, w, generator=generator, scale=3.0) for h, w in sizes]
    deltas = [halves(12, h, w, generator=generator, scale=0.5) for h, w in sizes]
    anchors = (
        sys.modules["mmdet.core.anchor.anchor_generator"]
        .AnchorGenerator(strides=[4, 8, 16, 32, 64], ratios=[0.5, 1.0, 2.0], scales=[8])
        .grid_priors(sizes, device="cpu")
    )
    head = types.SimpleNamespace(
        use_sigmoid_cls=True, test_cfg=None, bbox_coder=coder_module.DeltaXYWHBBoxCoder()
    )
    head._bbox_post_process = functools.partial(rpn_head.RPNHead._bbox_post_process, head)
    cases = []
    for nms_pre, max_per_img in ((1000, 1000), (100, 60)):
        config = Config(nms_pre=nms_pre, max_per_img=max_per_img, nms=Config(type="nms", iou_threshold=0.7),
                        min_bbox_size=0)  # fmt: skip
        found = rpn_head.RPNHead._get_bboxes_single(
            head, scores, deltas, None, anchors, {"img_shape": (60, 75, 3)}, config
        )
        cases.append({"nms_pre": nms_pre, "max_per_img": max_per_img, "proposals": found[:, :4]})
    return {"featmap_sizes": sizes, "image_shape": (60, 75), "scores": [x.half() for x in scores],
            "deltas": [x.half() for x in deltas], "cases": cases}  # fmt: skip


def detections(
    bbox_head: types.ModuleType, coder_module: types.ModuleType, generator: torch.Generator
) -> dict:
    """mmdet's `BBoxHead.get_bboxes` (rescale=True, 8 classes) on random outputs for 200 proposals."""
    count, classes, shape, original = 200, 8, (60, 75), (90, 100)
    corners = torch.rand(count, 2, generator=generator) * torch.tensor([75.0, 60.0])
    sizes = torch.rand(count, 2, generator=generator) * 40 + 1
    rois = torch.cat([corners, corners + sizes], 1).half().float()
    logits = halves(count, classes + 1, generator=generator, scale=3.0)  # mmdet: background last
    deltas = halves(count, classes * 4, generator=generator, scale=0.3)
    scale_factor = torch.tensor([shape[1] / original[1], shape[0] / original[0]] * 2).numpy()
    head = types.SimpleNamespace(
        custom_cls_channels=False,
        bbox_coder=coder_module.DeltaXYWHBBoxCoder(target_stds=(0.1, 0.1, 0.2, 0.2)),
    )
    config = Config(score_thr=0.05, nms=Config(type="nms", iou_threshold=0.5), max_per_img=100)
    boxes, labels = bbox_head.BBoxHead.get_bboxes(
        head, torch.cat([torch.zeros(count, 1), rois], 1), logits, deltas, (*shape, 3), scale_factor,
        rescale=True, cfg=config,
    )  # fmt: skip
    found = {"boxes": boxes[:, :4], "scores": boxes[:, 4], "labels": labels}
    return {"rois": rois.half(), "logits": logits.half(), "deltas": deltas.half(), "image_shape": shape,
            "original_size": original, **found}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("official", type=Path, help="the unpacked official PIIP code (holds mmdetection/)")
    parser.add_argument("out", type=Path, help="folder for mask_rcnn_parts.pt")
    args = parser.parse_args()
    install_stubs()
    load(args.official, "mmdet.core.bbox.coder.base_bbox_coder")
    load(args.official, "mmdet.core.bbox.assigners.base_assigner")
    stub("mmdet.core.bbox.assigners.assign_result", AssignResult=assign_result)
    load(args.official, "mmdet.models.roi_heads.roi_extractors.base_roi_extractor")
    iou_module = load(args.official, "mmdet.core.bbox.iou_calculators.iou2d_calculator")
    sys.modules["mmdet.core.bbox.iou_calculators"].build_iou_calculator = lambda cfg: None
    generator = torch.Generator().manual_seed(SEED)
    parts = {
        "anchors": anchors(load(args.official, "mmdet.core.anchor.anchor_generator")),
        "coder": coder(load(args.official, "mmdet.core.bbox.coder.delta_xywh_bbox_coder"), generator),
        "levels": levels(
            load(args.official, "mmdet.models.roi_heads.roi_extractors.single_level_roi_extractor"), generator
        ),
        "assign": assignments(
            iou_module, load(args.official, "mmdet.core.bbox.assigners.max_iou_assigner"), generator
        ),
        "paste": pasted(load(args.official, "mmdet.models.roi_heads.mask_heads.fcn_mask_head"), generator),
    }
    nms_module = load(args.official, "mmcv.ops.nms")
    sys.modules["mmcv.ops"].batched_nms = nms_module.batched_nms
    load(args.official, "mmdet.core.post_processing.bbox_nms")
    multiclass_nms = sys.modules["mmdet.core.post_processing.bbox_nms"].multiclass_nms
    sys.modules["mmdet.core"].multiclass_nms = multiclass_nms
    coder_module = sys.modules["mmdet.core.bbox.coder.delta_xywh_bbox_coder"]
    parts |= {
        "rpn": proposals(load(args.official, "mmdet.models.dense_heads.rpn_head"), coder_module, generator),
        "rcnn": detections(
            load(args.official, "mmdet.models.roi_heads.bbox_heads.bbox_head"), coder_module, generator
        ),  # fmt: skip
        "source": "mmdetection 2.x from the official PIIP code, via benchmarks/official/mask_rcnn_parts.py",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(parts, args.out / "mask_rcnn_parts.pt")
    print(f"wrote {args.out / 'mask_rcnn_parts.pt'}")


if __name__ == "__main__":
    main()
