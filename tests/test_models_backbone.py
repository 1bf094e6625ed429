"""PIIPBackbone end to end: pyramid shapes/strides, equivalence of a fresh model with its branches, gradient
flow through the interactions, position-embedding resampling, classification heads
(training-side behaviour: tests/test_models_backbone_training.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from piip.errors import ConfigError
from piip.models import PIIPBackbone, WindowConfig, build_branch
from piip.models.backbone.deformable import DeformableAttention

PYRAMID_STRIDES = (4, 8, 16, 32)


def set_gammas(model: PIIPBackbone, value: float) -> None:
    """Fill every interaction gamma (ca_gamma / cffn_gamma) with `value`."""
    with torch.no_grad():
        for name, param in model.interactions.named_parameters():
            if name.endswith(("ca_gamma", "cffn_gamma")):
                param.fill_(value)


def expected_pyramid_sizes(height: int, width: int) -> list[tuple[int, int]]:
    return [(height // s, width // s) for s in PYRAMID_STRIDES]


def assert_pyramid(pyramid, batch: int, channels: int | list[int], height: int, width: int) -> None:
    channels = channels if isinstance(channels, list) else [channels] * 4
    assert pyramid is not None and len(pyramid) == 4
    for level, c, (h, w) in zip(pyramid, channels, expected_pyramid_sizes(height, width), strict=True):
        assert tuple(level.shape) == (batch, c, h, w)
        assert level.dtype == torch.float32
        assert torch.isfinite(level).all()


def independent_branch_maps(model: PIIPBackbone, images: torch.Tensor) -> list[torch.Tensor]:
    """Each branch on its own: resize the image to the branch's share of its resolution, embed, all blocks."""
    height, width = images.shape[-2:]
    top = model.config.resolutions[0]
    maps = []
    for branch, resolution in zip(model.branches, model.config.resolutions, strict=True):
        size = (height * resolution // top, width * resolution // top)
        x = (
            images
            if size == (height, width)
            else F.interpolate(images, size, mode="bilinear", align_corners=False)
        )
        state = branch.forward_blocks(branch.embed(x), 0, branch.depth - 1)
        maps.append((state.x.permute(0, 3, 1, 2), state.prefix))
    return maps


# -- 1. output shapes and strides --------------------------------------------------------------------------
# (branch widths, resolutions) for ViT-only models; the largest branch is last.
VIT_LAYOUTS = {
    1: ([64], [128]),
    2: ([32, 64], [128, 64]),
    3: ([32, 32, 64], [128, 96, 64]),
    4: ([32, 32, 64, 96], [128, 96, 64, 32]),
}


@pytest.mark.parametrize("num_branches", [1, 2, 3, 4])
@pytest.mark.parametrize("image_size", [(128, 128), (128, 192)])
def test_vit_pyramid_has_strides_4_8_16_32(build_piip, vit_spec, num_branches, image_size):
    dims, resolutions = VIT_LAYOUTS[num_branches]
    specs = [vit_spec(f"b{k}", d) for k, d in enumerate(dims)]
    model = build_piip(specs, resolutions, head="pyramid", merge="simple_fpn")
    out = model(torch.randn(2, 3, *image_size))

    assert_pyramid(out.pyramid, 2, dims[-1], *image_size)
    assert len(out.branch_maps) == num_branches
    for k, (fmap, dim, res) in enumerate(zip(out.branch_maps, dims, resolutions, strict=True)):
        h, w = (s * res // resolutions[0] // 16 for s in image_size)
        assert tuple(fmap.shape) == (2, dim, h, w), f"branch {k}"
    # merged features: largest width on branch 0's grid
    assert tuple(out.features.shape) == (2, dims[-1], image_size[0] // 16, image_size[1] // 16)


@pytest.mark.parametrize("num_branches", [2, 3])
def test_vit_regular_fpn_pyramid_has_strides_4_8_16_32(build_piip, vit_spec, num_branches):
    dims, resolutions = VIT_LAYOUTS[num_branches]
    specs = [vit_spec(f"b{k}", d, depth=4) for k, d in enumerate(dims)]
    model = build_piip(
        specs, resolutions, num_interactions=4, merge="regular_fpn", out_interaction_indexes=[0, 1, 2]
    )
    out = model(torch.randn(1, 3, 128, 128))
    assert_pyramid(out.pyramid, 1, dims[-1], 128, 128)
    assert len(model.intermediate_merges) == 3


@pytest.mark.parametrize("merge", ["simple_fpn", "none", "classification"])
def test_single_branch_pyramid_ignores_merge(build_piip, vit_spec, merge):
    """One branch = the baseline: nothing is merged, so every merge setting gives the same pyramid."""
    reference = build_piip([vit_spec("solo", 64)], [128], merge="simple_fpn")
    model = build_piip([vit_spec("solo", 64)], [128], merge=merge)
    model.load_state_dict(reference.state_dict())
    assert model.merge is None
    images = torch.randn(1, 3, 128, 128)
    out, ref = model(images), reference(images)
    assert_pyramid(out.pyramid, 1, 64, 128, 128)
    for level, ref_level in zip(out.pyramid, ref.pyramid, strict=True):
        torch.testing.assert_close(level, ref_level)
    torch.testing.assert_close(out.features, out.branch_maps[0])


def test_single_branch_regular_fpn_uses_the_branch_itself(build_piip, vit_spec):
    model = build_piip(
        [vit_spec("solo", 64, depth=4)],
        [128],
        num_interactions=4,
        merge="regular_fpn",
        out_interaction_indexes=[0, 1, 2],
    )
    assert len(model.intermediate_merges) == 0 and model.merge is None
    out = model(torch.randn(1, 3, 128, 128))
    assert_pyramid(out.pyramid, 1, 64, 128, 128)


@pytest.mark.parametrize("image_size", [(128, 128), (128, 192)])
def test_convnext_branch0_hybrid_regular_fpn_strides(
    build_piip, vit_spec, convnext_spec, convnext_stride_stages, image_size
):
    """ConvNeXt at the highest resolution + two ViTs; regular FPN taps after the stride-4/8/16 stages."""
    specs = [
        convnext_spec("cnx", interaction_indexes=convnext_stride_stages),
        vit_spec("vs", 32, depth=4),
        vit_spec("vb", 64, depth=4),
    ]
    model = build_piip(
        specs, [128, 96, 64], num_interactions=4, merge="regular_fpn", out_interaction_indexes=[0, 1, 2]
    )
    cnx = model.branches[0]
    assert [cnx.strides[end] for _, end in model.stage_ranges[0]] == [4, 8, 16, 32]
    out = model(torch.randn(2, 3, *image_size))
    assert_pyramid(out.pyramid, 2, 64, *image_size)
    h, w = image_size
    assert tuple(out.branch_maps[0].shape) == (2, 64, h // 32, w // 32)
    assert tuple(out.branch_maps[1].shape) == (2, 32, h * 96 // 128 // 16, w * 96 // 128 // 16)


def test_vit_branch0_with_convnext_largest_branch(build_piip, vit_spec, convnext_spec):
    specs = [vit_spec("vit", 32), convnext_spec("cnx")]
    model = build_piip(specs, [128, 64], num_interactions=2, merge="simple_fpn")
    # 12 ConvNeXt blocks split into 2 stages; their interaction widths are 48 (after block 5) and 64
    assert model.stage_ranges[1] == [(0, 5), (6, 11)]
    out = model(torch.randn(2, 3, 128, 128))
    assert_pyramid(out.pyramid, 2, 64, 128, 128)
    assert tuple(out.branch_maps[1].shape) == (2, 64, 2, 2)  # 64 px at stride 32
    assert model.out_channels == 64


@pytest.mark.parametrize("indexes", [[2, 1, 0], [0, 0, 1], [-1, 0, 1], [0, 1, 3]])
def test_bad_out_interaction_indexes_rejected(
    build_piip, vit_spec, convnext_spec, convnext_stride_stages, indexes
):
    """Unordered, repeated, negative or final-stage indexes would build a pyramid with wrong strides."""
    specs = [convnext_spec("cnx", interaction_indexes=convnext_stride_stages), vit_spec("vb", 64, depth=4)]
    with pytest.raises(ConfigError, match="out_interaction_indexes"):
        build_piip(specs, [128, 64], num_interactions=4, merge="regular_fpn", out_interaction_indexes=indexes)


# -- 2. a fresh PIIP computes exactly its branches ---------------------------------------------------------
@pytest.mark.parametrize("use_windows", [True, False], ids=["windows", "cls_token"])
def test_fresh_model_equals_independent_branches(build_piip, vit_spec, use_windows):
    specs = [
        vit_spec("t", 32),
        vit_spec("s", 32, window_pad="tokens"),
        vit_spec("b", 64, depth=4),
    ]
    kwargs = dict(window=WindowConfig(size=4, global_every=2)) if use_windows else dict(use_cls_token=True)
    model = build_piip(specs, [128, 96, 64], merge="simple_fpn", **kwargs)
    images = torch.randn(2, 3, 128, 128)  # branch grids 8x8, 6x6 (padded windows), 4x4

    with torch.no_grad():
        out = model(images)
        reference = independent_branch_maps(model, images)
    for k, (fmap, (ref_map, ref_prefix)) in enumerate(zip(out.branch_maps, reference, strict=True)):
        torch.testing.assert_close(fmap, ref_map, atol=1e-5, rtol=0, msg=f"branch {k}")
        if use_windows:
            assert out.cls_tokens[k] is None
        else:
            torch.testing.assert_close(out.cls_tokens[k], ref_prefix, atol=1e-5, rtol=0, msg=f"cls {k}")

    # the comparison is not vacuous: once the gammas are nonzero the interactions change every branch
    set_gammas(model, 0.1)
    with torch.no_grad():
        changed = model(images).branch_maps
    for k, (fmap, (ref_map, _)) in enumerate(zip(changed, reference, strict=True)):
        assert (fmap - ref_map).abs().max() > 1e-3, f"branch {k} unaffected by its interactions"


def test_fresh_interactions_use_deformable_detr_init(build_piip, vit_spec):
    """init_new_weights re-initialises Linear layers but must keep the Deformable DETR offset/weight init."""
    model = build_piip([vit_spec("s", 32), vit_spec("b", 64)], [128, 64], num_interactions=2)
    deformables = [m for m in model.interactions.modules() if isinstance(m, DeformableAttention)]
    assert len(deformables) == 2 * 2  # 2 stages x (small->large, large->small)
    for attn in deformables:
        assert torch.count_nonzero(attn.sampling_offsets.weight) == 0
        assert torch.count_nonzero(attn.attention_weights.weight) == 0
        assert torch.count_nonzero(attn.attention_weights.bias) == 0
        bias = attn.sampling_offsets.bias.view(attn.num_heads, attn.num_points, 2)
        torch.testing.assert_close(bias[:, 0].abs().amax(-1), torch.ones(attn.num_heads))
    for name, param in model.interactions.named_parameters():
        if name.endswith(("ca_gamma", "cffn_gamma")):
            assert torch.count_nonzero(param) == 0, name


# -- 3. gradients reach every interaction unit -------------------------------------------------------------
def pyramid_loss(out) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return sum((level * torch.randn(level.shape, generator=generator)).sum() for level in out.pyramid)


def test_gradients_reach_every_interaction_parameter(build_piip, vit_spec):
    specs = [vit_spec("t", 32), vit_spec("s", 32), vit_spec("b", 64)]
    model = build_piip(specs, [128, 96, 64], num_interactions=2)
    set_gammas(model, 0.1)
    # Deformable DETR init zeroes the offset / attention-weight projections, so at step 0 the query reaches
    # the output only through them and `query_norm` gets exactly zero gradient. Perturb them as a step would.
    with torch.no_grad():
        for attn in (m for m in model.interactions.modules() if isinstance(m, DeformableAttention)):
            attn.sampling_offsets.weight.normal_(0, 0.02)
            attn.attention_weights.weight.normal_(0, 0.02)
    pyramid_loss(model(torch.randn(2, 3, 128, 128))).backward()
    params = list(model.interactions.named_parameters())
    assert len(params) > 0
    for name, param in params:
        assert param.grad is not None, f"{name} got no gradient"
        assert param.grad.abs().sum() > 0, f"{name} got an all-zero gradient"


def test_zero_gammas_receive_gradients(build_piip, vit_spec):
    """With zero-initialised gammas only the gammas get gradient at first, which is what starts training."""
    specs = [vit_spec("t", 32), vit_spec("s", 32), vit_spec("b", 64)]
    model = build_piip(specs, [128, 96, 64], num_interactions=2)
    pyramid_loss(model(torch.randn(2, 3, 128, 128))).backward()
    gammas = [
        (n, p) for n, p in model.interactions.named_parameters() if n.endswith(("ca_gamma", "cffn_gamma"))
    ]
    assert len(gammas) == 2 * 2 * 2 * 2  # stages x units x directions x (ca, cffn)
    for name, param in gammas:
        assert param.grad is not None and param.grad.abs().sum() > 0, name


# -- 7. position embeddings follow the input size ----------------------------------------------------------
@pytest.mark.parametrize("size, grid", [((64, 64), (4, 4)), ((96, 128), (6, 8)), ((224, 224), (14, 14))])
def test_vit_embed_resamples_pos_embed(vit_spec, size, grid):
    branch = build_branch(vit_spec("v", 32)).eval()
    assert branch.pos_embed_grid == (14, 14)  # pretrain_img_size 224 / patch 16
    images = torch.randn(2, 3, *size)
    with torch.no_grad():
        state = branch.embed(images)
        patches = branch.patch_embed.proj(images).permute(0, 2, 3, 1)
    assert tuple(state.x.shape) == (2, *grid, 32)
    assert state.grid == grid
    stored = branch.pos_embed[:, 1:].reshape(1, 14, 14, 32).permute(0, 3, 1, 2).detach()
    expected_pos = F.interpolate(stored, size=grid, mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    torch.testing.assert_close(state.x - patches, expected_pos.expand(2, -1, -1, -1), atol=1e-5, rtol=0)
    if grid == (14, 14):  # the stored grid is used as is
        torch.testing.assert_close(state.x - patches, stored.permute(0, 2, 3, 1).expand(2, -1, -1, -1))


def test_backbone_branch_sizes_follow_input(build_piip, vit_spec):
    model = build_piip([vit_spec("s", 32), vit_spec("b", 64)], [128, 64])
    assert model.branch_sizes(96, 128) == [(96, 128), (48, 64)]
    out = model(torch.randn(1, 3, 96, 128))
    assert [tuple(m.shape[-2:]) for m in out.branch_maps] == [(6, 8), (3, 4)]
    assert_pyramid(out.pyramid, 1, 64, 96, 128)


def test_branch_inputs_are_resized_by_scale_factor_as_upstream(build_piip, vit_spec):
    """1120/896/448 on a 448 x 336 input: 0.8 and 0.4 of it are fractional sizes (358.4, 179.2, ...), where
    a scale factor and a target size sample different positions; upstream resizes by the factor."""
    model = build_piip([vit_spec("t", 32), vit_spec("s", 32), vit_spec("b", 64)], [1120, 896, 448])
    images = torch.randn(1, 3, 448, 336)
    seen = []
    for branch in model.branches:
        branch.patch_embed.proj.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        model(images)
    assert model.branch_sizes(448, 336) == [(448, 336), (358, 268), (179, 134)]
    for x, scale in zip(seen, (1.0, 0.8, 0.4), strict=True):
        upstream = images if scale == 1 else F.interpolate(images, scale_factor=scale, mode="bilinear")
        torch.testing.assert_close(x, upstream, rtol=0, atol=0)
    by_size = F.interpolate(images, size=(179, 134), mode="bilinear")
    assert (seen[2] - by_size).abs().max() > 0.1  # the other sampling would have been visibly different


# -- 9. classification heads -------------------------------------------------------------------------------
def classification_model(build_piip, vit_spec, **overrides):
    specs = [vit_spec("s", 32), vit_spec("b", 64)]
    overrides = (
        dict(head="classification", merge="classification", use_cls_token=True, num_classes=7) | overrides
    )
    return build_piip(specs, [64, 32], **overrides)


def test_merged_classifier_logits(build_piip, vit_spec):
    model = classification_model(build_piip, vit_spec)
    assert model.pyramid is None
    out = model(torch.randn(3, 3, 64, 64))
    assert tuple(out.logits.shape) == (3, 7)
    assert tuple(out.features.shape) == (3, 64, 4, 4)  # largest width on branch 0's grid
    assert [tuple(c.shape) for c in out.cls_tokens] == [(3, 1, 32), (3, 1, 64)]
    assert out.pyramid is None
    # every image gets its own logits
    assert (out.logits[0] - out.logits[1]).abs().max() > 0


def test_cls_token_with_convnext_branch(build_piip, vit_spec, convnext_spec):
    """use_cls_token gives cls tokens to the branches that have one; a ConvNeXt branch carries none."""
    specs = [convnext_spec("cnx"), vit_spec("b", 64)]
    model = build_piip(specs, [128, 64], head="classification", merge="classification", use_cls_token=True)
    out = model(torch.randn(2, 3, 128, 128))
    assert out.cls_tokens[0] is None
    assert tuple(out.cls_tokens[1].shape) == (2, 1, 64)
    assert tuple(out.logits.shape) == (2, model.config.num_classes)


def test_per_branch_classifier_cls_vs_first_patch(build_piip, vit_spec):
    cls_model = classification_model(build_piip, vit_spec, classifier="per_branch", classifier_token="cls")
    patch_model = classification_model(
        build_piip, vit_spec, classifier="per_branch", classifier_token="first_patch"
    )
    patch_model.load_state_dict(cls_model.state_dict())
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        by_cls, by_patch = cls_model(images), patch_model(images)

    assert tuple(by_cls.logits.shape) == tuple(by_patch.logits.shape) == (2, 7)
    for a, b in zip(by_cls.branch_maps, by_patch.branch_maps, strict=True):
        torch.testing.assert_close(a, b)  # same backbone, only the token differs
    assert (by_cls.logits - by_patch.logits).abs().max() > 1e-4

    head = patch_model.classifier
    with torch.no_grad():
        expected_patch = torch.stack(
            [
                fc(norm(fmap[:, :, 0, 0]))
                for norm, fc, fmap in zip(head.norms, head.fcs, by_patch.branch_maps, strict=True)
            ]
        ).mean(0)
        expected_cls = torch.stack(
            [
                fc(norm(cls[:, 0]))
                for norm, fc, cls in zip(head.norms, head.fcs, by_cls.cls_tokens, strict=True)
            ]
        ).mean(0)
    torch.testing.assert_close(by_patch.logits, expected_patch, atol=1e-5, rtol=0)
    torch.testing.assert_close(by_cls.logits, expected_cls, atol=1e-5, rtol=0)


# -- 10. layer ids for layer-wise lr decay -----------------------------------------------------------------
