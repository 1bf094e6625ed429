"""DINO's contrastive denoising queries (mmdet's `CdnQueryGenerator` with dynamic groups), built on the input
device and, when given a `generator`, reproducibly.

During training the decoder receives, in front of its `num_queries` matching queries, `num_groups` groups of
noised copies of the ground truths. A group holds `max_gt` positive slots (the largest number of ground
truths of an image in the batch) and then `max_gt` negative slots: positives are nudged by less than half
their size and must be reconstructed, negatives are pushed further (between one and two half-sizes per
corner) and must be called background. Slot j of each half copies ground truth j; slots past an image's own
count are padding (zero content, zero unactivated box) and are background in the loss. There are
`num_dn // max_gt` groups (at least one), so the number of denoising queries stays near `num_dn`.

Labels are noised in both halves: each flips with probability `label_noise / 2` to a uniform class (possibly
the same one). The attention mask keeps the matching queries blind to the denoising ones (which carry the
answers) and each group blind to the others, while every denoising query still sees the matching queries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert

BOX_EPS = 1e-3  # mmdet's inverse_sigmoid eps for the denoising boxes


@dataclass
class Denoising:
    """The denoising queries of one batch and how they are laid out.

    `labels` (B, pad, D) query content, `boxes` (B, pad, 4) unactivated (cx, cy, w, h) references,
    `attn_mask` (pad + Nq, pad + Nq) with True where a query may NOT attend.
    """

    labels: Tensor
    boxes: Tensor
    attn_mask: Tensor
    num_groups: int
    group_size: int  # 2 * max_gt: max_gt positive slots, then max_gt negative slots

    @property
    def pad(self) -> int:
        """Number of denoising queries in front of the matching queries."""
        return self.num_groups * self.group_size


def inverse_sigmoid(x: Tensor, eps: float = BOX_EPS) -> Tensor:
    """logit(x) with x clamped to [0, 1] and both x and 1 - x floored at eps (mmdet's `inverse_sigmoid`)."""
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Uniform [0, 1) draws; with a generator they are drawn where it lives (a CPU generator cannot drive
    CUDA randoms) and then moved, so a seeded CPU generator gives the same noise on every device."""
    source = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=source).to(device)


def _randint(
    high: int, shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device
) -> Tensor:
    source = generator.device if generator is not None else device
    return torch.randint(0, high, shape, generator=generator, device=source).to(device)


def num_denoising_groups(max_gt: int, num_dn: int) -> int:
    """Dynamic group count: about `num_dn` positive queries in all, at least one group."""
    return max(1, num_dn // max_gt) if max_gt > 0 else 1


def denoising_attn_mask(num_groups: int, group_size: int, num_queries: int, device: torch.device) -> Tensor:
    """(pad + Nq, pad + Nq), True = may not attend: matching queries do not see denoising queries, and a
    denoising group sees only itself and the matching queries."""
    pad = num_groups * group_size
    mask = torch.zeros(pad + num_queries, pad + num_queries, dtype=torch.bool, device=device)
    mask[pad:, :pad] = True
    group = torch.arange(pad, device=device) // max(group_size, 1)
    mask[:pad, :pad] = group[:, None] != group[None, :]
    return mask


def _noised_boxes(
    boxes: Tensor, num_groups: int, box_noise: float, generator: torch.Generator | None
) -> Tensor:
    """(num_groups, 2, n, 4) normalised (cx, cy, w, h): each corner moves by up to half the box size (index 0,
    positives) or by one to two half-sizes (index 1, negatives), times `box_noise`, in a random direction."""
    copies = boxes.expand(num_groups, 2, *boxes.shape)
    if box_noise <= 0:
        return copies.clone()
    device = boxes.device
    corners = box_convert(copies.reshape(-1, 4), "cxcywh", "xyxy").view(copies.shape)
    half = copies[..., 2:].repeat(1, 1, 1, 2) / 2  # [w/2, h/2, w/2, h/2]
    sign = _randint(2, copies.shape, generator, device).to(boxes.dtype) * 2 - 1
    part = _rand(copies.shape, generator, device).to(boxes.dtype)
    part[:, 1] += 1.0
    corners = (corners + part * sign * half * box_noise).clamp(0, 1)
    return box_convert(corners.reshape(-1, 4), "xyxy", "cxcywh").view(copies.shape)


def make_denoising(
    labels: list[Tensor],
    boxes: list[Tensor],
    label_embedding: nn.Embedding,
    num_classes: int,
    num_queries: int,
    num_dn: int = 100,
    label_noise: float = 0.5,
    box_noise: float = 1.0,
    generator: torch.Generator | None = None,
) -> Denoising:
    """The denoising queries for a batch: per image `labels` (G,) in 0..num_classes-1 and `boxes` (G, 4)
    normalised (cx, cy, w, h). Content comes from `label_embedding` (in float32, with its gradient)."""
    if len(labels) != len(boxes):
        raise ValueError(f"make_denoising: {len(labels)} label tensors but {len(boxes)} box tensors")
    for index, (image_labels, image_boxes) in enumerate(zip(labels, boxes, strict=True)):
        if image_boxes.shape != (image_labels.shape[0], 4):
            raise ValueError(
                f"make_denoising: image {index}: expected labels (G,) and boxes (G, 4), got "
                f"{tuple(image_labels.shape)} and {tuple(image_boxes.shape)}"
            )
    weight = label_embedding.weight.float()
    device = weight.device
    max_gt = max((len(image_labels) for image_labels in labels), default=0)
    num_groups = num_denoising_groups(max_gt, num_dn)
    group_size = 2 * max_gt
    pad = num_groups * group_size
    batch = len(labels)
    content = weight.new_zeros(batch, num_groups, 2, max_gt, weight.shape[1])
    references = weight.new_zeros(batch, num_groups, 2, max_gt, 4)
    for index, (image_labels, image_boxes) in enumerate(zip(labels, boxes, strict=True)):
        count = len(image_labels)
        if count == 0:
            continue
        noisy = image_labels.to(device).long().expand(num_groups, 2, count)
        if label_noise > 0:
            flip = _rand(noisy.shape, generator, device) < label_noise * 0.5
            noisy = torch.where(flip, _randint(num_classes, noisy.shape, generator, device), noisy)
        content[index, :, :, :count] = F.embedding(noisy, weight)
        noised = _noised_boxes(image_boxes.to(device).float(), num_groups, box_noise, generator)
        references[index, :, :, :count] = inverse_sigmoid(noised)
    return Denoising(
        labels=content.reshape(batch, pad, weight.shape[1]),
        boxes=references.reshape(batch, pad, 4),
        attn_mask=denoising_attn_mask(num_groups, group_size, num_queries, device),
        num_groups=num_groups,
        group_size=group_size,
    )


def split_outputs(tensor: Tensor, pad: int) -> tuple[Tensor, Tensor]:
    """(layers, B, pad + Nq, X) decoder outputs as (denoising part, matching part)."""
    return tensor[:, :, :pad], tensor[:, :, pad:]
