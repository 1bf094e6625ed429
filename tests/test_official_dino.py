"""piip's DINO neck and head against the official code's (mmdet 2.x `ChannelMapper` + `DINOHead`, mmcv 1.7.0).

Golden values: `fixtures/official/dino_head.pt`, written by `benchmarks/official/dino_fixtures.py` from the
official tree: a tiny neck and head (tests/test_dino.py's TINY sizes) with random 8-bit weights, random
backbone maps of a 128 x 128 batch holding a 128 x 128 and a 96 x 112 image, and upstream's outputs. The
official weights go through `convert_dino` and strict loading, so every name and every layer is checked."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from piip.models.convert.mmdet_dino import convert_dino
from piip.models.heads.dino import DINO, DINOConfig, HeadOutputs, normalise_target
from piip.models.heads.dino_denoising import Denoising, denoising_attn_mask, make_denoising
from tests.official_fixtures import read

TOLERANCE = dict(rtol=0.0, atol=1e-5)
PIXELS = dict(rtol=1e-6, atol=1e-5)  # boxes in pixels (up to 160)


class MapsOnly(nn.Module):
    """Stands in for the backbone: the fixture's maps go straight into `detector.neck`; DINO reads only the
    pyramid's strides and widths (and branch 0's stride, for the padding check)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.pyramid = SimpleNamespace(strides=[8, 16, 32], out_channels=[channels] * 3)
        self.branches = [SimpleNamespace(name="b1", strides=[16])]
        self.grad_checkpointing = False


def decode(codes: torch.Tensor, exponent: int | torch.Tensor) -> torch.Tensor:
    """The fixture's 8-bit codes -> the float values upstream ran with."""
    return codes.float() * 2.0 ** -int(exponent)


def official_state(packed: dict) -> dict[str, torch.Tensor]:
    out, offset = {}, 0
    for key, shape, exponent in zip(packed["keys"], packed["shapes"], packed["exponents"], strict=True):
        size = int(torch.Size(shape).numel())
        out[key] = decode(packed["codes"][offset : offset + size], exponent).reshape(shape)
        offset += size
    return out


@pytest.fixture(scope="module")
def golden() -> dict:
    return read("dino_head")


@pytest.fixture(scope="module")
def dino(golden: dict) -> DINO:
    config = dict(golden["config"])
    num_classes, channels = config.pop("num_classes"), config.pop("in_channels")
    model = DINO(MapsOnly(channels), num_classes, DINOConfig.from_dict(config | {"size_divisible": 32}))
    converted, unplaced = convert_dino(official_state(golden["state"]))
    assert unplaced == []
    model.load_state_dict({k.removeprefix("detector."): v for k, v in converted.items()}, strict=True)
    return model


def neck_maps(dino: DINO, golden: dict) -> list[torch.Tensor]:
    maps = [decode(c, e) for c, e in zip(golden["maps"], golden["map_exponents"], strict=True)]
    return dino.neck(maps)


def close(name: str, ours: torch.Tensor, theirs: torch.Tensor, tolerance: dict = TOLERANCE) -> None:
    """assert_close, printing the largest difference (run with -s to see them)."""
    print(f"{name}: max |delta| = {(ours - theirs).abs().max().item():.2e}")
    torch.testing.assert_close(ours, theirs, **tolerance)


@torch.no_grad()
def test_neck_and_head_compute_upstreams_logits_boxes_and_encoder_top_k(dino: DINO, golden: dict) -> None:
    dino.eval()
    outputs, _ = dino.heads(neck_maps(dino, golden), golden["image_sizes"])
    expected = golden["eval"]
    for layer in range(expected["logits"].shape[0]):
        close(f"logits, decoder layer {layer}", outputs.logits[layer], expected["logits"][layer])
        close(f"boxes, decoder layer {layer}", outputs.boxes[layer], expected["boxes"][layer])
    close("encoder top-k logits", outputs.enc_logits, expected["enc_logits"])
    close("encoder top-k boxes", outputs.enc_boxes, expected["enc_boxes"])


@torch.no_grad()
def test_detections_are_upstreams_get_bboxes(dino: DINO, golden: dict) -> None:
    """Top 50 (query, class) pairs of the last layer, clipped to the image; and rescaled to the stored size
    (upstream divides by the scale factor, piip multiplies by original / resized)."""
    dino.eval()
    sizes = golden["image_sizes"]
    outputs, _ = dino.heads(neck_maps(dino, golden), sizes)
    for original, key in ((sizes, "detections"), (golden["original_sizes"], "detections_rescaled")):
        found = dino.detections(outputs, sizes, original)
        for index, (ours, theirs) in enumerate(zip(found, golden[key], strict=True)):
            close(f"{key} {index}: boxes", ours["boxes"], theirs["boxes"], PIXELS)
            close(f"{key} {index}: scores", ours["scores"], theirs["scores"])
            assert torch.equal(ours["labels"], theirs["labels"] + 1)


@torch.no_grad()
def test_training_forward_with_upstreams_denoising_queries(dino: DINO, golden: dict) -> None:
    """Upstream's `CdnQueryGenerator` queries (4 groups of 3 positive and 3 negative slots) in front of the
    matching queries, its attention mask, the head in training mode."""
    train = golden["train"]
    pad, groups = train["pad_size"], train["num_groups"]
    assert torch.equal(
        denoising_attn_mask(groups, pad // groups, dino.config.num_queries, torch.device("cpu")),
        train["attn_mask"],
    )
    denoising = Denoising(
        train["label_query"].float(), train["box_query"], train["attn_mask"], groups, pad // groups
    )
    dino.train()
    try:
        outputs, _ = dino.heads(neck_maps(dino, golden), golden["image_sizes"], denoising)
    finally:
        dino.eval()
    assert isinstance(outputs, HeadOutputs)
    for layer in range(train["logits"].shape[0]):
        close(f"training logits, decoder layer {layer}", outputs.logits[layer], train["logits"][layer])
        close(f"training boxes, decoder layer {layer}", outputs.boxes[layer], train["boxes"][layer])


@torch.no_grad()
def test_noise_free_denoising_queries_are_laid_out_as_upstreams(dino: DINO, golden: dict) -> None:
    """Without noise both generators are deterministic: same slots, contents, boxes and mask."""
    clean = golden["clean_denoising"]
    targets = [
        normalise_target({"boxes": boxes, "labels": labels + 1}, size)
        for boxes, labels, size in zip(
            golden["gt_boxes"], golden["gt_labels"], golden["image_sizes"], strict=True
        )
    ]
    ours = make_denoising(
        [t["labels"] for t in targets],
        [t["boxes"] for t in targets],
        dino.label_embedding,
        dino.num_classes,
        dino.config.num_queries,
        dino.config.num_dn,
        label_noise=0.0,
        box_noise=0.0,
    )
    assert (ours.pad, ours.num_groups) == (clean["pad_size"], clean["num_groups"])
    assert torch.equal(ours.labels, clean["label_query"].float())
    close("noise-free denoising boxes", ours.boxes, clean["box_query"])
    assert torch.equal(ours.attn_mask, clean["attn_mask"])
