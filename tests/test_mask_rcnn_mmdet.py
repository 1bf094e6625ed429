"""`flavour: mmdet` Mask R-CNN computes what mmdet 2.x's `mask_rcnn_r50_fpn` computes, where torchvision's own
parts differ: anchors, RoI levels and RoIAlign, the assigner, the box coder, L1 losses, mask targets and
pasting, the test-time filters, and the class order of converted checkpoints. Expected values are written
here from mmdet's formulas (the golden test against mmdet's own code is `test_official_mask_rcnn_parts.py`).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection.image_list import ImageList

from piip.errors import ConfigError
from piip.models import PIIPBackbone
from piip.models.heads.mask_rcnn import MaskRCNN, MaskRCNNConfig
from tests.conftest import make_piip_config, make_vit_spec

NUM_CLASSES = 3
SLIM = dict(fpn_channels=16, size_divisible=64, box_head_dim=32, mask_head_channels=8,
            rpn_batch_size_per_image=32, box_batch_size_per_image=32)  # fmt: skip


def build(**config: object) -> MaskRCNN:
    torch.manual_seed(0)
    spec = make_vit_spec(dim=32)
    backbone = PIIPBackbone(make_piip_config([spec], [64], head="pyramid", merge="simple_fpn"))
    return MaskRCNN(backbone, NUM_CLASSES, MaskRCNNConfig.from_dict({**SLIM, **config}))


@pytest.fixture(scope="module")
def detector() -> MaskRCNN:
    return build().eval()


def test_anchors_follow_mmdets_unrounded_formula_at_strides_4_to_64(detector):
    sizes = [(40, 40), (20, 20), (10, 10), (5, 5), (3, 3)]  # a 160 x 160 batch: the stride-64 map is 3 wide
    maps = [torch.zeros(1, 1, *size) for size in sizes]
    (anchors,) = detector.rpn.anchor_generator(ImageList(torch.zeros(1, 3, 160, 160), [(160, 160)]), maps)
    expected = []
    for (height, width), stride, size in zip(sizes, [4, 8, 16, 32, 64], [32, 64, 128, 256, 512], strict=True):
        for y in range(height):
            for x in range(width):
                for ratio in (0.5, 1.0, 2.0):  # height / width
                    w, h = size / math.sqrt(ratio), size * math.sqrt(ratio)
                    expected.append(
                        [x * stride - w / 2, y * stride - h / 2, x * stride + w / 2, y * stride + h / 2]
                    )
    torch.testing.assert_close(anchors, torch.tensor(expected), rtol=0, atol=1e-4)


def mmdet_level(boxes: torch.Tensor) -> torch.Tensor:
    scale = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    return torch.floor(torch.log2(scale / 56 + 1e-6)).clamp(0, 3).long()


def test_rois_pool_from_mmdets_level_also_on_the_boundaries(detector):
    torchvision_level = lambda b: (
        torch.floor(4 + torch.log2(mmdet_scale(b) / 224) + 1e-6).clamp(2, 5) - 2
    ).long()
    mmdet_scale = lambda b: torch.sqrt((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))
    sides = [side - k * side * 2**-24 for side in (112.0, 224.0, 448.0) for k in range(0, 40, 2)]
    boxes = torch.tensor([[10.0, 10.0, 10.0 + s, 10.0 + s] for s in [20.0, 300.0, 480.0, *sides]])
    expected = mmdet_level(boxes)
    assert (expected != torchvision_level(boxes)).any()  # the boundaries differ, so this test can fail
    features = {name: torch.full((1, 1, 512 // s, 512 // s), float(i + 1)) for i, (name, s) in
                enumerate(zip(["0", "1", "2", "3", "pool"], [4, 8, 16, 32, 64], strict=True))}  # fmt: skip
    pooled = detector.roi_heads.box_roi_pool(features, [boxes], [(512, 512)])
    assert torch.equal(pooled.mean(dim=(1, 2, 3)), (expected + 1).float())


def test_roi_align_is_aligned_and_samples_adaptively(detector):
    """An 84-pixel box on the stride-4 map: 3 x 3 feature pixels per bin, so ceil(3) = 3 samples per bin side
    at half-pixel-shifted positions (mmdet); torchvision's 2 unshifted samples give other values."""
    ramp = torch.arange(128.0) ** 2  # varies along x only, not linearly: sample positions matter
    features = {"0": ramp.expand(1, 1, 128, 128).contiguous()}
    features |= {
        name: torch.zeros(1, 1, 128 // 2**i, 128 // 2**i) for i, name in enumerate(["1", "2", "3"], 1)
    }
    box = torch.tensor([[8.0, 8.0, 92.0, 92.0]])
    pooled = detector.roi_heads.box_roi_pool(features, [box], [(512, 512)])[0, 0]

    def bilinear(x: float) -> float:
        low = math.floor(x)
        return float(ramp[low] * (1 - (x - low)) + ramp[low + 1] * (x - low))

    start, bin_size = 8 / 4 - 0.5, (92 - 8) / 4 / 7
    samples = math.ceil(bin_size)
    expected = [
        sum(bilinear(start + j * bin_size + (k + 0.5) * bin_size / samples) for k in range(samples)) / samples
        for j in range(7)
    ]
    torch.testing.assert_close(pooled, torch.tensor(expected).expand(7, 7), rtol=0, atol=1e-3)


def test_box_coder_divides_by_mmdets_stds_and_clamps_log_sizes_on_both_sides(detector):
    box = torch.tensor([[0.0, 0.0, 100.0, 100.0]])
    decoded = detector.roi_heads.box_coder.decode_single(torch.tensor([[1.0, -1.0, -25.0, 25.0]]), box)
    width, height = 100 * math.exp(-math.log(1000 / 16)), 100 * math.exp(math.log(1000 / 16))
    centre = (50 + 0.1 * 100, 50 - 0.1 * 100)  # stds .1, .1, .2, .2: dw = dh = -+5, clamped to -+4.135
    expected = [centre[0] - width / 2, centre[1] - height / 2, centre[0] + width / 2, centre[1] + height / 2]
    torch.testing.assert_close(decoded, torch.tensor([expected]), rtol=1e-6, atol=1e-3)


def test_low_quality_matches_follow_mmdets_assigner(detector):
    iou = torch.tensor([
        [0.25, 0.10, 0.80, 0.00],  # gt 0: best IoU 0.8 at box 2
        [0.05, 0.20, 0.75, 0.65],  # gt 1: best IoU 0.75, also at box 2
        [0.00, 0.28, 0.00, 0.00],  # gt 2: best IoU 0.28 < min_pos_iou 0.3 -> no low-quality match
    ])  # fmt: skip
    matches = detector.rpn.proposal_matcher(iou)
    # box 1 is not matched to gt 2 but negative (< 0.3); box 2 goes to gt 1, whose best it is (the last gt
    # wins); box 3 stays ignored (0.3 <= 0.65 < 0.7); box 0 is negative
    assert matches.tolist() == [-1, -1, 1, -2]


def test_roi_assignment_matches_proposals_alone_and_gives_each_gt_box_to_its_gt(detector):
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [2.0, 0.0, 12.0, 10.0]])
    proposal = torch.tensor([[0.5, 0.0, 10.5, 10.0]])  # IoU 0.905 with gt 0, 0.739 with gt 1 (gt 1's best)
    with_gt = torch.cat([proposal, gt])  # torchvision's `add_gt_proposals` appends the gt boxes
    matched, labels = detector.roi_heads.assign_targets_to_proposals([with_gt], [gt], [torch.tensor([1, 3])])
    assert matched[0].tolist() == [1, 0, 1]  # low-quality match to gt 1 (mmdet), gt boxes to themselves
    assert labels[0].tolist() == [3, 1, 3]


def test_rpn_training_ignores_anchors_outside_the_image_padded_on_its_own(detector):
    maps = [torch.zeros(1, 1, 16 // 2**i, 48 // 2**i) for i in range(4)] + [torch.zeros(1, 1, 1, 1)]
    images = ImageList(torch.zeros(2, 3, 64, 192), [(64, 60), (64, 190)])
    anchors = detector.rpn.anchor_generator(images, maps)
    grid_sizes = [tuple(m.shape[-2:]) for m in maps]
    valid = [detector.rpn.anchor_generator.valid_flags(grid_sizes, detector.rpn.pad_shape(s), "cpu")
             for s in images.image_sizes]  # fmt: skip
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 50.0, 50.0]])}, {"boxes": torch.zeros(0, 4)}]
    labels, _ = detector.rpn.assign(anchors, targets, valid)
    centres_x = (anchors[0][:, 0] + anchors[0][:, 2]) / 2
    outside = centres_x >= 64  # image 0 alone is padded to 64 wide
    assert outside.any() and (labels[0][outside] == -1).all()
    assert (labels[0][~outside] >= 0).any() and (labels[1] == 0).all()  # image 1 fills the batch width


def test_losses_are_l1_and_sums_over_the_sampled_count(detector):
    eps = torch.finfo(torch.float32).eps
    objectness = torch.tensor([[2.0], [-1.0], [0.5], [-3.0]])
    deltas = torch.tensor([[0.5, -0.2, 0.05, 1.0], [0.3, 0.3, 0.3, 0.3], [0.0] * 4, [9.0] * 4])
    targets = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.2, 0.1, -0.3, 0.4], [1.0] * 4, [0.0] * 4])
    labels = torch.tensor([1.0, 1.0, 0.0, 0.0])  # 4 anchors, all sampled (256 per image)
    loss_objectness, loss_box = detector.rpn.compute_loss(objectness, deltas, [labels], [targets])
    bce = F.binary_cross_entropy_with_logits(objectness[:, 0], labels, reduction="sum")
    torch.testing.assert_close(loss_objectness, bce / (4 + eps))
    torch.testing.assert_close(loss_box, (deltas[:2] - targets[:2]).abs().sum() / (4 + eps))

    class_logits = torch.tensor([[0.1, 0.2, 2.0, -1.0], [1.5, 0.0, 0.3, 0.3], [0.0, 1.0, 0.0, 0.5]])
    regression = torch.arange(48.0).reshape(3, 16) / 40
    roi_labels, roi_targets = torch.tensor([2, 0, 1]), torch.full((3, 4), 0.25)
    losses = detector.roi_heads.box_loss(class_logits, regression, [roi_labels], [roi_targets])
    torch.testing.assert_close(losses["loss_classifier"], F.cross_entropy(class_logits, roi_labels))
    own_class = torch.stack([regression[0, 8:12], regression[2, 4:8]])  # label k: columns 4k..4k+3
    torch.testing.assert_close(losses["loss_box_reg"], (own_class - 0.25).abs().sum() / (3 + eps))


def test_mask_targets_are_aligned_roi_aligns_of_the_gt_binarised():
    from piip.models.heads.mmdet_ops import mask_targets

    gt = torch.zeros(2, 40, 50)
    gt[1, 5:25, 10:20] = 1.0
    on_grid = mask_targets(gt, torch.tensor([[0.0, 0.0, 28.0, 28.0]]), torch.tensor([1]), 28)
    assert torch.equal(on_grid[0], gt[1, :28, :28])  # aligned samples hit pixel centres: the crop itself
    off_grid = mask_targets(gt, torch.tensor([[0.3, 0.6, 35.1, 30.2]]), torch.tensor([1]), 28)
    assert set(off_grid.unique().tolist()) == {0.0, 1.0}  # binarised at 0.5, not soft
    # mmdet pads the masks with the image (to 64 x 64 here): beyond the 40 x 50 mask the target is empty
    gt[1] = 1.0
    beyond = mask_targets(gt, torch.tensor([[30.0, 20.0, 58.0, 48.0]]), torch.tensor([1]), 28, (64, 64))
    expected = torch.zeros(28, 28)
    expected[:20, :20] = 1.0  # pixel centres 20 + j < 40 and 30 + i < 50
    assert torch.equal(beyond[0], expected)


def reference_paste(masks: torch.Tensor, boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """mmdet's paste on GPU: every pixel centre of the image, mapped into its box, bilinear, >= 0.5."""
    ys = torch.arange(height, dtype=torch.float32) + 0.5
    xs = torch.arange(width, dtype=torch.float32) + 0.5
    x0, y0, x1, y1 = boxes[:, 0:1], boxes[:, 1:2], boxes[:, 2:3], boxes[:, 3:4]
    gx = ((xs - x0) / (x1 - x0) * 2 - 1)[:, None, :].expand(-1, height, width)
    gy = ((ys - y0) / (y1 - y0) * 2 - 1)[:, :, None].expand(-1, height, width)
    return F.grid_sample(masks, torch.stack([gx, gy], dim=3), align_corners=False) >= 0.5


def test_masks_are_pasted_with_grid_sample_over_the_image_and_binarised(detector):
    from piip.models.heads.mmdet_ops import paste_masks

    torch.manual_seed(3)
    masks = torch.rand(5, 1, 28, 28)
    boxes = torch.tensor([[2.3, 4.1, 30.7, 25.2], [0.0, 0.0, 64.0, 48.0], [40.5, 10.5, 63.9, 47.9],
                          [10.0, 30.0, 12.0, 31.0], [5.5, 5.5, 20.5, 20.5]])  # fmt: skip
    pasted = paste_masks(masks, boxes, 48, 64)
    assert torch.equal(pasted.bool(), reference_paste(masks, boxes, 48, 64))
    with torch.no_grad():
        detector.roi_heads.score_thresh = 0.0
        (found,) = detector([torch.rand(3, 64, 48) * 255], [{"orig_size": torch.tensor([96, 72])}])
        detector.roi_heads.score_thresh = 0.05
    assert len(found["boxes"]) > 0 and found["masks"].shape[1:] == (1, 96, 72)
    assert set(found["masks"].unique().tolist()) <= {0.0, 1.0}


def test_test_time_filters_keep_thin_boxes_as_mmdet(detector):
    rpn = detector.rpn
    anchors = torch.tensor([[10.0, 10.0, 10.0005, 40.0], [30.0, 30.0, 50.0, 50.0]])  # 5e-4 wide: kept
    proposals = rpn.propose(torch.tensor([3.0, 2.0]), torch.zeros(2, 4), anchors, (64, 64), [2])
    torch.testing.assert_close(proposals, anchors)
    logits = torch.tensor(
        [[-5.0, 5.0, -5.0, -5.0]]
    )  # class 1, 0.005 wide: kept (torchvision: < 0.01 dropped)
    (found,) = detector.roi_heads.boxes_at(
        logits, torch.zeros(1, 16), [torch.tensor([[5.0, 5.0, 5.005, 30.0]])], [(64, 64)], [(64, 64)]
    )
    assert found["labels"].tolist() == [1] and len(found["boxes"]) == 1


def test_class_order_permutation_round_trips_and_keeps_the_softmax():
    from piip.models.convert.mmdet_rcnn import background_first, background_last

    mm_logits = torch.randn(6, NUM_CLASSES + 1)  # mmdet: classes 0..K-1, background last
    ours = background_first(mm_logits.T, 1, True).T
    assert torch.equal(background_last(ours.T, 1, True).T, mm_logits)
    torch.testing.assert_close(ours.softmax(-1)[:, 1:], mm_logits.softmax(-1)[:, :-1])
    mm_boxes = torch.randn(4 * NUM_CLASSES, 5)
    assert torch.equal(background_last(background_first(mm_boxes, 4, False), 4, False), mm_boxes)


def test_the_torchvision_flavour_keeps_torchvisions_parts_under_the_same_names():
    legacy = build(flavour="torchvision")
    mmdet = build()
    assert {k: v.shape for k, v in legacy.state_dict().items()} == {
        k: v.shape for k, v in mmdet.state_dict().items()
    }
    cells = legacy.rpn.anchor_generator.cell_anchors[0]
    assert torch.equal(cells, cells.round()) and not torch.equal(
        mmdet.rpn.anchor_generator.cell_anchors[0], cells
    )
    with pytest.raises(
        ConfigError, match=r"task.module.detector.flavour: expected one of \['mmdet', 'torchvision'\]"
    ):
        MaskRCNNConfig.from_dict({"flavour": "detectron2"})
