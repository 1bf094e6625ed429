"""DINO's matcher, contrastive denoising queries and losses (`piip.models.heads.dino_*`), against brute force,
hand-computed values and the layout mmdet 2.x's `CdnQueryGenerator` and `DINOHead` use."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn
from torchvision.ops import box_convert, box_iou

from piip.models.heads import dino_losses
from piip.models.heads.dino_denoising import Denoising, make_denoising, split_outputs
from piip.models.heads.dino_losses import DINOCriterion, LossWeights, mean_over_processes
from piip.models.heads.dino_matching import MatchCosts, hungarian_match, match_cost

SIZE = (60, 80)  # (h, w)


def random_boxes(count: int, gen: torch.Generator) -> torch.Tensor:
    """Normalised (cx, cy, w, h) boxes well inside the image."""
    centres = 0.3 + 0.4 * torch.rand(count, 2, generator=gen)
    sizes = 0.05 + 0.3 * torch.rand(count, 2, generator=gen)
    return torch.cat([centres, sizes], dim=1)


def make_targets(counts: list[int], num_classes: int, gen: torch.Generator) -> list[dict]:
    return [
        {
            "labels": torch.randint(0, num_classes, (count,), generator=gen),
            "boxes": random_boxes(count, gen),
            "size": (SIZE[0] + 8 * image, SIZE[1]),
        }
        for image, count in enumerate(counts)
    ]


# ---------------------------------------------------------------- matching


@pytest.mark.parametrize(("queries", "gts"), [(5, 3), (4, 4), (6, 1), (3, 5)])
def test_hungarian_match_is_the_cheapest_assignment(queries: int, gts: int) -> None:
    gen = torch.Generator().manual_seed(queries * 10 + gts)
    costs = MatchCosts()
    for _ in range(3):
        logits = torch.randn(queries, 4, generator=gen)
        boxes, target_boxes = random_boxes(queries, gen), random_boxes(gts, gen)
        labels = torch.randint(0, 4, (gts,), generator=gen)
        cost = match_cost(logits, boxes, labels, target_boxes, SIZE, costs)
        rows, cols = hungarian_match(logits, boxes, labels, target_boxes, SIZE, costs)
        assert rows.dtype == cols.dtype == torch.long
        assert len(rows) == min(queries, gts)
        assert len(set(rows.tolist())) == len(rows) and len(set(cols.tolist())) == len(cols)
        if gts <= queries:
            brute = min(
                sum(cost[q, g] for g, q in enumerate(p)) for p in itertools.permutations(range(queries), gts)
            )
        else:
            brute = min(
                sum(cost[q, g] for q, g in enumerate(p)) for p in itertools.permutations(range(gts), queries)
            )
        assert cost[rows, cols].sum().item() == pytest.approx(float(brute), abs=1e-5)


def test_match_cost_terms_by_hand() -> None:
    logits = torch.tensor([[0.3, -1.2]])
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.4]])
    target = torch.tensor([[0.55, 0.45, 0.3, 0.2]])
    size = (100, 200)
    p = 1 / (1 + math.exp(1.2))
    focal = -math.log(p + 1e-12) * 0.25 * (1 - p) ** 2 + math.log(1 - p + 1e-12) * 0.75 * p**2
    l1 = 0.05 + 0.05 + 0.1 + 0.2
    # pixels: pred [80, 30, 120, 70], target [80, 35, 140, 55]: inter 800, union 2000, hull 2400
    giou = 800 / 2000 - (2400 - 2000) / 2400
    only = {"focal": 0.0, "l1": 0.0, "giou": 0.0}
    label = torch.tensor([1])
    for name, expected in (("focal", focal), ("l1", l1), ("giou", -giou)):
        costs = MatchCosts(**{**only, name: 3.0})
        assert match_cost(logits, boxes, label, target, size, costs).item() == pytest.approx(
            3 * expected, rel=1e-5
        )
    total = match_cost(logits, boxes, label, target, size, MatchCosts()).item()
    assert total == pytest.approx(2 * focal + 5 * l1 - 2 * giou, rel=1e-5)


def test_hungarian_match_without_ground_truth() -> None:
    rows, cols = hungarian_match(
        torch.randn(5, 3),
        torch.rand(5, 4),
        torch.zeros(0, dtype=torch.long),
        torch.zeros(0, 4),
        SIZE,
        MatchCosts(),
    )
    assert rows.shape == cols.shape == (0,) and rows.dtype == torch.long


# ---------------------------------------------------------------- denoising


def embedding(num_classes: int, dim: int | None = None) -> nn.Embedding:
    """With dim == num_classes the weight is the identity, so argmax of a query's content is its label."""
    layer = nn.Embedding(num_classes, dim or num_classes)
    if dim is None:
        with torch.no_grad():
            layer.weight.copy_(torch.eye(num_classes))
    return layer


def denoise(targets: list[dict], classes: int, queries: int, **kwargs) -> Denoising:
    labels, boxes = [t["labels"] for t in targets], [t["boxes"] for t in targets]
    return make_denoising(labels, boxes, embedding(classes), classes, queries, **kwargs)


@pytest.mark.parametrize(("count", "groups"), [(0, 1), (1, 100), (7, 14), (150, 1)])
def test_denoising_group_count(count: int, groups: int) -> None:
    gen = torch.Generator().manual_seed(count)
    targets = make_targets([count, count // 2], 5, gen)
    labels, boxes = [t["labels"] for t in targets], [t["boxes"] for t in targets]
    dn = make_denoising(labels, boxes, embedding(5, 8), 5, 9)
    assert dn.num_groups == groups and dn.group_size == 2 * count and dn.pad == groups * 2 * count
    assert dn.labels.shape == (2, dn.pad, 8) and dn.boxes.shape == (2, dn.pad, 4)
    assert dn.attn_mask.shape == (dn.pad + 9, dn.pad + 9) and dn.attn_mask.dtype == torch.bool


def test_denoising_layout_and_padding() -> None:
    labels = [torch.tensor([0, 1, 2]), torch.tensor([3])]
    boxes = [torch.full((3, 4), 0.3), torch.full((1, 4), 0.3)]
    layer = embedding(4)
    dn = make_denoising(labels, boxes, layer, 4, 5, num_dn=6, label_noise=0.0, box_noise=0.0)
    assert (dn.num_groups, dn.group_size) == (2, 6)
    found = dn.labels.argmax(-1)
    for group in range(2):
        start = group * 6
        assert found[0, start : start + 6].tolist() == [0, 1, 2, 0, 1, 2]  # positives, then negatives
        assert found[1, start].item() == found[1, start + 3].item() == 3
        for slot in (1, 2, 4, 5):  # padding of the image with one ground truth
            assert dn.labels[1, start + slot].abs().sum() == 0 and dn.boxes[1, start + slot].abs().sum() == 0
    assert torch.allclose(dn.boxes[0].sigmoid(), torch.full((12, 4), 0.3))
    dn.labels.sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


def test_denoising_box_noise_bounds() -> None:
    gen = torch.Generator().manual_seed(0)
    gt = torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.45, 0.55, 0.3, 0.2]])
    dn = make_denoising(
        [torch.tensor([0, 1])], [gt], embedding(2), 2, 3, num_dn=200, box_noise=1.0, generator=gen
    )
    noised = box_convert(dn.boxes[0].sigmoid(), "cxcywh", "xyxy").view(dn.num_groups, 2, 2, 4)
    corners = box_convert(gt, "cxcywh", "xyxy")
    half = gt[:, 2:].repeat(1, 2) / 2
    moved = (noised - corners).abs() / half  # per corner, in half-sizes
    assert moved[:, 0].max() < 1 + 1e-4
    # a negative's corners may cross (as upstream, inverse_sigmoid then floors its size at 1e-3): skip those
    upright = (dn.boxes[0].sigmoid()[:, 2:] > 2e-3).all(-1).view(dn.num_groups, 2, 2)[:, 1]
    assert upright.sum() > 100
    negatives = moved[:, 1][upright]
    assert negatives.min() > 1 - 1e-4 and negatives.max() < 2 + 1e-4
    iou = torch.stack(
        [box_iou(noised[:, k, j], corners[j : j + 1])[:, 0] for k in range(2) for j in range(2)]
    )
    positives, negatives = iou.view(2, 2, -1).unbind(0)
    assert positives.mean() > negatives.mean() + 0.2


def test_denoising_label_flip_rate() -> None:
    gen = torch.Generator().manual_seed(1)
    classes, changed, total = 10, 0, 0
    for _ in range(50):
        gt = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
        dn = make_denoising([torch.tensor([3])], [gt], embedding(classes), classes, 4, generator=gen)
        found = dn.labels[0].argmax(-1)
        changed += (found != 3).sum().item()
        total += found.numel()
    # flipped with probability 0.25, to one of the 10 classes (1 in 10 is the same label)
    assert changed / total == pytest.approx(0.25 * 0.9, abs=0.02)


def test_denoising_attention_mask() -> None:
    labels = [torch.tensor([0, 1]), torch.tensor([1])]
    boxes = [torch.full((2, 4), 0.4), torch.full((1, 4), 0.4)]
    dn = make_denoising(labels, boxes, embedding(2), 2, 5, num_dn=6)
    pad, size, mask = dn.pad, dn.group_size, dn.attn_mask
    assert (pad, size) == (12, 4)
    assert mask[pad:, :pad].all()  # matching queries never see denoising queries
    assert not mask[:, pad:].any()  # everyone sees the matching queries
    for i in range(pad):
        for j in range(pad):
            assert mask[i, j].item() == (i // size != j // size)
    empty = make_denoising([torch.zeros(0, dtype=torch.long)], [torch.zeros(0, 4)], embedding(2), 2, 5)
    assert empty.pad == 0 and empty.labels.shape == (1, 0, 2) and not empty.attn_mask.any()


def test_denoising_generator_reproducible() -> None:
    labels, boxes = [torch.tensor([0, 1, 1])], [torch.rand(3, 4) * 0.5 + 0.2]
    layer = embedding(3, 6)

    def draw(seed: int) -> Denoising:
        return make_denoising(labels, boxes, layer, 3, 4, generator=torch.Generator().manual_seed(seed))

    first, again, other = draw(5), draw(5), draw(6)
    assert torch.equal(first.labels, again.labels) and torch.equal(first.boxes, again.boxes)
    assert not torch.equal(first.boxes, other.boxes)


def test_split_outputs() -> None:
    tensor = torch.arange(2 * 3 * 7 * 1).view(2, 3, 7, 1)
    dn, matching = split_outputs(tensor, 4)
    assert dn.shape == (2, 3, 4, 1) and matching.shape == (2, 3, 3, 1) and matching[0, 0, 0, 0] == 4


# ---------------------------------------------------------------- losses


def perfect(targets: list[dict], layers: int, queries: int, classes: int, gen: torch.Generator):
    """Outputs whose first queries are exactly the ground truths and the rest confident background."""
    logits = torch.full((layers, len(targets), queries, classes), -10.0)
    boxes = random_boxes(layers * len(targets) * queries, gen).view(layers, len(targets), queries, 4)
    for image, target in enumerate(targets):
        count = len(target["labels"])
        logits[:, image, torch.arange(count), target["labels"]] = 10.0
        boxes[:, image, :count] = target["boxes"]
    return logits, boxes


def test_perfect_predictions() -> None:
    gen = torch.Generator().manual_seed(0)
    targets = make_targets([3, 1], 4, gen)
    logits, boxes = perfect(targets, 2, 6, 4, gen)
    losses = DINOCriterion(4)(logits, boxes, logits[0], boxes[0], targets)
    for name, value in losses.items():
        if "bbox" in name or "iou" in name:
            assert value.item() < 1e-5, name
    noisy = DINOCriterion(4)(torch.randn(2, 2, 6, 4, generator=gen), boxes, logits[0], boxes[0], targets)
    assert losses["loss_cls"] < 1e-3 < noisy["loss_cls"]
    assert losses["d0.loss_cls"] < noisy["d0.loss_cls"]


def test_loss_values_by_hand() -> None:
    """One query per image and one ground truth: L1 and focal from the formulas, avg factor 1."""
    target = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]]), "size": (10, 10)}]
    logits = torch.tensor([[[[0.5, -0.5]]]])
    boxes = torch.tensor([[[[0.52, 0.5, 0.2, 0.16]]]])
    losses = DINOCriterion(2)(logits, boxes, logits[0], boxes[0], target)
    assert losses["loss_bbox"].item() == pytest.approx(5 * 0.06, rel=1e-5)
    p0, p1 = torch.sigmoid(torch.tensor([0.5, -0.5])).tolist()
    focal = -0.75 * p0**2 * math.log(1 - p0) - 0.25 * (1 - p1) ** 2 * math.log(p1)
    assert losses["loss_cls"].item() == pytest.approx(focal, rel=1e-5)
    # pred [4.2, 4.2, 6.2, 5.8] vs target [4, 4, 6, 6]: inter 1.8 * 1.6, union 4 + 3.2 - 2.88, hull 2.2 * 2
    inter, union, hull = 2.88, 4.32, 4.4
    assert losses["loss_iou"].item() == pytest.approx(
        2 * (1 - inter / union + (hull - union) / hull), rel=1e-4
    )


def loss_names(layers: int, denoising: bool) -> set[str]:
    kinds = ("cls", "bbox", "iou")
    prefixes = ["loss", "interm_loss"] + [f"d{i}.loss" for i in range(layers - 1)]
    if denoising:
        prefixes += ["dn_loss"] + [f"d{i}.dn_loss" for i in range(layers - 1)]
    return {f"{prefix}_{kind}" for prefix in prefixes for kind in kinds}


@pytest.mark.parametrize("with_dn", [False, True])
def test_loss_names_and_gradients(with_dn: bool) -> None:
    gen = torch.Generator().manual_seed(2)
    classes, queries, layers = 3, 5, 6
    targets = make_targets([2, 1], classes, gen)
    dn = None
    if with_dn:
        dn = denoise(targets, classes, queries, num_dn=4, generator=gen)
    pad = dn.pad if dn else 0
    logits = torch.randn(layers, 2, pad + queries, classes, generator=gen, requires_grad=True)
    raw = torch.randn(layers, 2, pad + queries, 4, generator=gen, requires_grad=True)
    enc_logits = torch.randn(2, 7, classes, generator=gen, requires_grad=True)
    enc_raw = torch.randn(2, 7, 4, generator=gen, requires_grad=True)
    losses = DINOCriterion(classes)(logits, raw.sigmoid(), enc_logits, enc_raw.sigmoid(), targets, dn)
    assert set(losses) == loss_names(layers, with_dn) and len(losses) == (39 if with_dn else 21)
    assert all(value.dim() == 0 and torch.isfinite(value) for value in losses.values())
    sum(losses.values()).backward()
    for tensor in (logits, raw, enc_logits, enc_raw):
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0
    if with_dn:  # (num_groups, group_size) = (2, 4): box gradients only at the positive slots
        assert dn is not None and (dn.num_groups, dn.group_size) == (2, 4)
        has_grad = raw.grad[:, :, :pad].abs().sum(dim=(0, 3)) > 0
        expected = torch.zeros(2, 8, dtype=torch.bool)
        expected[0, [0, 1, 4, 5]] = True
        expected[1, [0, 4]] = True
        assert torch.equal(has_grad, expected)


def test_no_ground_truth_gives_finite_losses() -> None:
    targets = [{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4), "size": SIZE}] * 2
    dn = denoise(targets, 3, 4)
    logits = torch.randn(2, 2, 4, 3, requires_grad=True)
    boxes = torch.rand(2, 2, 4, 4, requires_grad=True)
    losses = DINOCriterion(3)(logits, boxes, logits[0], boxes[0], targets, dn)
    assert set(losses) == loss_names(2, True)
    assert all(torch.isfinite(value) for value in losses.values())
    assert all(value.item() == 0 for name, value in losses.items() if "bbox" in name or "iou" in name)
    assert losses["loss_cls"] > 0
    sum(losses.values()).backward()
    assert boxes.grad is not None and boxes.grad.abs().sum() == 0 and logits.grad.abs().sum() > 0


def test_denoising_targets() -> None:
    """Positives are ground truth j of their group; negatives and padding are background without boxes."""
    gen = torch.Generator().manual_seed(3)
    classes, queries = 3, 4
    targets = make_targets([2, 1], classes, gen)
    dn = denoise(targets, classes, queries, num_dn=4, generator=gen)
    assert (dn.num_groups, dn.group_size) == (2, 4)
    logits, boxes = perfect(targets, 1, queries, classes, gen)
    dn_logits = torch.full((1, 2, dn.pad, classes), -10.0)
    dn_boxes = random_boxes(2 * dn.pad, gen).view(1, 2, dn.pad, 4)
    for image, target in enumerate(targets):
        for group in range(dn.num_groups):
            slots = group * dn.group_size + torch.arange(len(target["labels"]))
            dn_logits[0, image, slots, target["labels"]] = 10.0
            dn_boxes[0, image, slots] = target["boxes"]
    criterion = DINOCriterion(classes)

    def run(dn_logits: torch.Tensor, dn_boxes: torch.Tensor) -> dict[str, torch.Tensor]:
        all_logits, all_boxes = torch.cat([dn_logits, logits], 2), torch.cat([dn_boxes, boxes], 2)
        return criterion(all_logits, all_boxes, logits[0], boxes[0], targets, dn)

    clean = run(dn_logits, dn_boxes)
    assert clean["dn_loss_bbox"] < 1e-5 and clean["dn_loss_iou"] < 1e-5 and clean["dn_loss_cls"] < 1e-3
    negatives = torch.tensor([2, 3, 6, 7])  # image 0: slots 2, 3 of each group; padding of image 1 below
    wrong_boxes, wrong_logits = dn_boxes.clone(), dn_logits.clone()
    wrong_boxes[0, 0, negatives] = random_boxes(4, gen)
    wrong_boxes[0, 1, [1, 2, 3, 5, 6, 7]] = random_boxes(6, gen)
    wrong_logits[0, 0, negatives, targets[0]["labels"].repeat(2)] = 10.0  # negatives called their gt class
    wrong = run(wrong_logits, wrong_boxes)
    assert wrong["dn_loss_bbox"] == clean["dn_loss_bbox"] and wrong["dn_loss_iou"] == clean["dn_loss_iou"]
    assert wrong["dn_loss_cls"] > clean["dn_loss_cls"] + 1
    assert wrong["loss_cls"] == clean["loss_cls"]  # the matching part is untouched


def test_denoising_avg_factor_by_hand() -> None:
    """One ground truth, two groups of (positive, negative): positives are slots 0 and 2, avg factor 2."""
    target = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]]), "size": (10, 10)}]
    dn = make_denoising([target[0]["labels"]], [target[0]["boxes"]], embedding(2), 2, 1, num_dn=2)
    assert dn.pad == 4
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(1, 1, 5, 2, generator=gen)
    boxes = random_boxes(5, gen).view(1, 1, 5, 4)
    losses = DINOCriterion(2, weights=LossWeights(focal=3.0))(logits, boxes, logits[0], boxes[0], target, dn)
    p = logits[0, 0, :4].sigmoid()
    positive = torch.zeros(4, 2, dtype=torch.bool)
    positive[[0, 2], 1] = True
    focal = torch.where(positive, -0.25 * (1 - p) ** 2 * p.log(), -0.75 * p**2 * (1 - p).log())
    assert losses["dn_loss_cls"].item() == pytest.approx(3 * focal.sum().item() / 2, rel=1e-5)
    l1 = (boxes[0, 0, [0, 2]] - target[0]["boxes"]).abs().sum().item()
    assert losses["dn_loss_bbox"].item() == pytest.approx(5 * l1 / 2, rel=1e-5)


def test_mean_over_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    assert mean_over_processes(3.0, "cpu") == 3.0
    monkeypatch.setattr(dino_losses.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dino_losses.dist, "get_world_size", lambda: 2)
    other_rank = 7.0
    monkeypatch.setattr(dino_losses.dist, "all_reduce", lambda tensor: tensor.add_(other_rank))
    assert mean_over_processes(3.0, "cpu") == 5.0
