"""The DINO detector on a tiny PIIP backbone: what flows where (levels, masks, proposals, look-forward-twice),
that it learns one image, and that mmdet's DINO names convert onto it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from piip.errors import ConfigError
from piip.models import PIIPBackbone
from piip.models.backbone.deformable import DeformableAttention
from piip.models.convert.mmdet_dino import convert_dino
from piip.models.heads.detector import build_detector
from piip.models.heads.dino import DINO, valid_ratio
from piip.models.heads.dino_transformer import box_sine_embedding, sine_position_encoding
from piip.run.presets import model_config

TINY = {
    "name": "dino",
    "num_queries": 30,
    "num_encoder_layers": 1,
    "num_decoder_layers": 2,
    "dim": 64,
    "num_heads": 4,
    "ffn_dim": 128,
    "num_dn": 12,
    "size_divisible": 64,
}


def tiny_backbone(strides: list[int] | None = None) -> PIIPBackbone:
    config = model_config("piip_tiny", task="shapes_det")
    return PIIPBackbone(dataclasses.replace(config, pyramid_strides=strides or [8, 16, 32]))


@pytest.fixture(scope="module")
def dino() -> DINO:
    torch.manual_seed(0)
    return build_detector(tiny_backbone(), 3, dict(TINY))


def scene() -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Two bright rectangles of different classes on a dark 128 x 128 image."""
    image = torch.full((3, 128, 128), 20.0)
    image[:, 16:56, 20:70] = 230.0
    image[0, 80:120, 70:110] = 250.0
    image[1:, 80:120, 70:110] = 40.0
    boxes = torch.tensor([[20.0, 16.0, 70.0, 56.0], [70.0, 80.0, 110.0, 120.0]])
    return [image], [{"boxes": boxes, "labels": torch.tensor([1, 3]), "orig_size": torch.tensor([128, 128])}]


def test_pyramid_strides_leave_the_stride_4_tap_out_but_keep_tap_names() -> None:
    full, dino_form = tiny_backbone([4, 8, 16, 32]), tiny_backbone([8, 16, 32])
    pyramid = dino_form(torch.rand(1, 3, 128, 128)).pyramid
    assert [p.shape[-1] for p in pyramid] == [16, 8, 4]
    assert not any(k.startswith("pyramid.taps.0.") for k in dino_form.state_dict())
    tap_keys = {k for k in full.state_dict() if k.startswith("pyramid.taps.")}
    assert {k for k in dino_form.state_dict() if k.startswith("pyramid.taps.")} == {
        k for k in tap_keys if not k.startswith("pyramid.taps.0.")
    }


def test_detectors_refuse_a_pyramid_they_cannot_read() -> None:
    with pytest.raises(ConfigError, match=r"pyramid_strides.*\[8, 16, 32\]"):
        build_detector(tiny_backbone([4, 8, 16, 32]), 3, dict(TINY))
    with pytest.raises(ConfigError, match=r"pyramid_strides: Mask R-CNN"):
        build_detector(tiny_backbone([8, 16, 32]), 3, {"name": "mask_rcnn", "size_divisible": 64})
    with pytest.raises(ConfigError, match=r"task.module.detector: unknown field\(s\) \['anchor_sizes'\]"):
        build_detector(tiny_backbone(), 3, {**TINY, "anchor_sizes": [1]})
    with pytest.raises(ConfigError, match=r"detector.costs: unknown term"):
        build_detector(tiny_backbone(), 3, {**TINY, "costs": {"focal": 2.0, "iou": 1.0}})


def test_four_levels_and_a_padding_mask_per_level(dino: DINO) -> None:
    maps = dino.neck(dino.backbone(torch.rand(2, 3, 128, 128)).pyramid)
    assert [tuple(m.shape[-2:]) for m in maps] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    assert all(m.shape[1] == 64 for m in maps)
    padding = torch.zeros(2, 16, 16, dtype=torch.bool)
    padding[1, :, 12:] = True
    assert valid_ratio(padding).tolist() == [[1.0, 1.0], [0.75, 1.0]]


def test_sine_encodings_follow_detr() -> None:
    padding = torch.zeros(1, 4, 6, dtype=torch.bool)
    pos = sine_position_encoding(padding, 8, 20.0)
    assert pos.shape == (1, 16, 4, 6)
    # first y feature: sin(2 pi * (row + 1) / 4); first x feature: sin(2 pi * (col + 1) / 6)
    rows = torch.arange(1, 5, dtype=torch.float32)
    assert torch.allclose(pos[0, 0, :, 0], torch.sin(2 * torch.pi * rows / (4 + 1e-6)), atol=1e-5)
    assert torch.allclose(pos[0, 8, 0, 1], torch.sin(torch.tensor(2 * torch.pi * 2 / (6 + 1e-6))), atol=1e-5)
    box = torch.tensor([[[0.25, 0.5, 0.1, 0.2]]])
    embedding = box_sine_embedding(box, 4)
    assert embedding.shape == (1, 1, 16)
    assert torch.allclose(embedding[0, 0, [0, 4, 8, 12]], torch.sin(2 * torch.pi * box[0, 0, [1, 0, 2, 3]]))


def test_padded_and_border_tokens_propose_nothing(dino: DINO) -> None:
    memory = torch.randn(1, 16 + 4, 64)
    padding = torch.zeros(1, 20, dtype=torch.bool)
    padding[0, 3] = True  # level 0 (4 x 4), row 0, column 3
    projected, proposals = dino.proposals(memory, padding, [(4, 4), (2, 2)])
    assert torch.isinf(proposals[0, 3]).all()
    # level 1 boxes are 0.1 wide around centres 0.25 / 0.75: all usable; level 0 ones too (0.125 .. 0.875)
    assert torch.isfinite(proposals[0, 16:]).all()
    assert torch.allclose(proposals[0, 16].sigmoid(), torch.tensor([0.25, 0.25, 0.1, 0.1]))
    blank = dino.enc_output_norm(dino.enc_output(torch.zeros(64)))
    assert torch.allclose(projected[0, 3], blank, atol=1e-6)


def test_box_references_scale_offsets_by_the_box() -> None:
    attention = DeformableAttention(8, 8, num_heads=1, num_points=1, ratio=1.0, num_levels=1)
    value = torch.arange(16, dtype=torch.float32).view(1, 16, 1).expand(1, 16, 8).contiguous()
    query = torch.zeros(1, 1, 8)
    with torch.no_grad():  # one point offset by (+1, 0): half the box width to the right of its centre
        attention.sampling_offsets.bias.copy_(torch.tensor([1.0, 0.0]))
        attention.value_proj.weight.copy_(torch.eye(8))
        attention.output_proj.weight.copy_(torch.eye(8))
    box = torch.tensor([[[[0.375, 0.375, 0.5, 0.5]]]])  # centre of pixel (1, 1) in a 4 x 4 map, 2 px wide
    out = attention.attend(query, box, value, [(4, 4)])
    assert torch.allclose(out[0, 0], torch.full((8,), 6.0))  # pixel (row 1, column 2) = 1 * 4 + 2


def test_look_forward_twice_trains_the_previous_layers_box_head(dino: DINO) -> None:
    images, targets = scene()
    dino.train()
    dino.zero_grad()
    batch, _ = dino.batcher(images)
    maps = dino.neck(dino.backbone(batch.tensors).pyramid)
    outputs, _ = dino.heads(maps, [(128, 128)])
    outputs.boxes[1].sum().backward()  # the second layer's boxes only
    head0 = dino.box_heads[0][-2]
    assert head0.bias.grad is not None and head0.bias.grad.abs().sum() > 0
    # the decoder's second layer read the first layer's boxes detached: nothing reaches layer 0's FFN
    # through its boxes, only through its content; the encoder's box head gets none from layer 2's boxes
    assert dino.box_heads[-1][-2].bias.grad is None or dino.box_heads[-1][-2].bias.grad.abs().sum() == 0


def test_training_losses_reach_every_parameter(dino: DINO) -> None:
    images, targets = scene()
    dino.train()
    dino.zero_grad()
    losses = dino(images, targets)
    assert "dn_loss_cls" in losses and "interm_loss_bbox" in losses and "d0.loss_iou" in losses
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    missing = [n for n, p in dino.named_parameters() if p.grad is None]
    assert missing == []


def test_detections_are_the_top_pairs_at_the_stored_size(dino: DINO) -> None:
    images, targets = scene()
    dino.eval()
    with torch.no_grad():
        found = dino(images, [{"orig_size": torch.tensor([256, 512])}])[0]
    assert found["boxes"].shape == (3 * 30, 4)  # fewer than max_detections pairs: all of them
    assert found["scores"].equal(found["scores"].sort(descending=True).values)
    assert found["labels"].min() >= 1 and found["labels"].max() <= 3
    assert (found["boxes"][:, 0::2] <= 512).all() and (found["boxes"][:, 1::2] <= 256).all()


def test_a_tiny_dino_learns_one_image() -> None:
    torch.manual_seed(0)
    dino = build_detector(tiny_backbone(), 3, {**TINY, "num_dn": 0})
    images, targets = scene()
    optimizer = torch.optim.AdamW(dino.parameters(), lr=1e-3)
    dino.train()
    first = None
    for _ in range(80):
        loss = sum(dino(images, targets).values())
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5 * first
    dino.eval()
    with torch.no_grad():
        found = dino(images, [{"orig_size": torch.tensor([128, 128])}])[0]
    from torchvision.ops import box_iou

    for box, label in zip(targets[0]["boxes"], targets[0]["labels"], strict=True):
        best = found["labels"] == label
        top = found["boxes"][best][found["scores"][best].argmax()]
        assert box_iou(top[None], box[None]).item() > 0.5


def test_mmdet_names_convert_onto_every_parameter(dino: DINO) -> None:
    official = mmdet_names(dino)
    converted, unplaced = convert_dino(official | {"backbone.w1": torch.zeros(1)})
    assert unplaced == ["backbone.w1"]
    ours = {f"detector.{k}": v for k, v in dino.state_dict().items()}
    assert set(converted) == set(ours)
    assert all(converted[k].shape == ours[k].shape for k in ours)


def mmdet_names(dino: DINO) -> dict[str, torch.Tensor]:
    """The keys mmdet 2.x's DINO head and ChannelMapper hold for this configuration (written from mmcv's
    layer naming), with the shapes of piip's tensors."""
    state: dict[str, torch.Tensor] = {}
    c = dino.config
    dim, ffn = c.dim, c.ffn_dim
    t = torch.zeros
    for level, channels in enumerate(dino.backbone.pyramid.out_channels):
        state[f"neck.convs.{level}.conv.weight"] = t(dim, channels, 1, 1)
        state.update({f"neck.convs.{level}.gn.{p}": t(dim) for p in ("weight", "bias")})
    state["neck.extra_convs.0.conv.weight"] = t(dim, dino.backbone.pyramid.out_channels[-1], 3, 3)
    state.update({f"neck.extra_convs.0.gn.{p}": t(dim) for p in ("weight", "bias")})
    prefix = "bbox_head.transformer."
    points = c.num_heads * c.num_levels * c.num_points

    def deformable(key: str) -> None:
        for name, rows in (("sampling_offsets", 2 * points), ("attention_weights", points)):
            state[f"{key}.{name}.weight"], state[f"{key}.{name}.bias"] = t(rows, dim), t(rows)
        for name in ("value_proj", "output_proj"):
            state[f"{key}.{name}.weight"], state[f"{key}.{name}.bias"] = t(dim, dim), t(dim)

    def layer_rest(key: str, norms: int) -> None:
        state[f"{key}.ffns.0.layers.0.0.weight"], state[f"{key}.ffns.0.layers.0.0.bias"] = t(ffn, dim), t(ffn)
        state[f"{key}.ffns.0.layers.1.weight"], state[f"{key}.ffns.0.layers.1.bias"] = t(dim, ffn), t(dim)
        state.update({f"{key}.norms.{i}.{p}": t(dim) for i in range(norms) for p in ("weight", "bias")})

    for i in range(c.num_encoder_layers):
        deformable(f"{prefix}encoder.layers.{i}.attentions.0")
        layer_rest(f"{prefix}encoder.layers.{i}", 2)
    for i in range(c.num_decoder_layers):
        key = f"{prefix}decoder.layers.{i}"
        state[f"{key}.attentions.0.attn.in_proj_weight"] = t(3 * dim, dim)
        state[f"{key}.attentions.0.attn.in_proj_bias"] = t(3 * dim)
        state[f"{key}.attentions.0.attn.out_proj.weight"] = t(dim, dim)
        state[f"{key}.attentions.0.attn.out_proj.bias"] = t(dim)
        deformable(f"{key}.attentions.1")
        layer_rest(key, 3)
    for i, shape in ((0, (dim, 2 * dim)), (2, (dim, dim))):  # mmdet's build_MLP: Linear, ReLU, Linear
        state[f"{prefix}decoder.ref_point_head.{i}.weight"] = t(*shape)
        state[f"{prefix}decoder.ref_point_head.{i}.bias"] = t(dim)
    state.update(
        {f"{prefix}{n}.{p}": t(dim) for n in ("decoder.norm", "enc_output_norm") for p in ("weight", "bias")}
    )
    state[f"{prefix}enc_output.weight"], state[f"{prefix}enc_output.bias"] = t(dim, dim), t(dim)
    state[f"{prefix}level_embeds"] = t(c.num_levels, dim)
    state[f"{prefix}query_embed.weight"] = t(c.num_queries, dim)
    state["bbox_head.label_embedding.weight"] = t(dino.num_classes, dim)
    for i in range(c.num_decoder_layers + 1):
        state[f"bbox_head.cls_branches.{i}.weight"] = t(dino.num_classes, dim)
        state[f"bbox_head.cls_branches.{i}.bias"] = t(dino.num_classes)
        for j, rows in ((0, dim), (2, dim), (4, 4)):
            state[f"bbox_head.reg_branches.{i}.{j}.weight"] = t(rows, dim)
            state[f"bbox_head.reg_branches.{i}.{j}.bias"] = t(rows)
    return state


def test_grad_checkpointing_covers_the_detector_layers_and_keeps_gradients(dino: DINO) -> None:
    images, targets = scene()
    dino.train()
    grads = []
    for checkpointing in (False, True):
        dino.backbone.set_grad_checkpointing(checkpointing)
        dino.zero_grad()
        torch.manual_seed(1)  # the same denoising noise and drop path
        sum(dino(images, targets).values()).backward()
        grads.append([p.grad.clone() for p in (*dino.encoder.parameters(), *dino.decoder.parameters())])
        assert (
            dino.encoder.grad_checkpointing is checkpointing
            and dino.decoder.grad_checkpointing is checkpointing
        )
    dino.backbone.set_grad_checkpointing(False)
    for plain, checkpointed in zip(*grads, strict=True):
        torch.testing.assert_close(checkpointed, plain, atol=1e-5, rtol=1e-4)
