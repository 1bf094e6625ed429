"""Deformable attention against a loop-by-loop reference (manual bilinear interpolation, zero padding)."""

from __future__ import annotations

import math

import pytest
import torch

from piip.models.backbone.deformable import DeformableAttention, deformable_sample, reference_points


def reference_sample(
    value: torch.Tensor, grid: tuple[int, int], locations: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Straightforward loops over batch, queries, heads and points; float64 accumulation.

    Pixel (i, j) has its centre at ((j + 0.5) / W, (i + 0.5) / H); samples outside the map are zero.
    """
    B, _, heads, d = value.shape
    H, W = grid
    Nq, P = locations.shape[1], locations.shape[3]
    v = value.double().reshape(B, H, W, heads, d)
    out = torch.zeros(B, Nq, heads, d, dtype=torch.float64)
    for b in range(B):
        for q in range(Nq):
            for h in range(heads):
                for p in range(P):
                    x = float(locations[b, q, h, p, 0]) * W - 0.5
                    y = float(locations[b, q, h, p, 1]) * H - 0.5
                    x0, y0 = math.floor(x), math.floor(y)
                    fx, fy = x - x0, y - y0
                    sample = torch.zeros(d, dtype=torch.float64)
                    for yy, wy in ((y0, 1 - fy), (y0 + 1, fy)):
                        for xx, wx in ((x0, 1 - fx), (x0 + 1, fx)):
                            if 0 <= yy < H and 0 <= xx < W:
                                sample += wy * wx * v[b, yy, xx, h]
                    out[b, q, h] += float(weights[b, q, h, p]) * sample
    return out.reshape(B, Nq, heads * d)


def reference_attention(attn: DeformableAttention, query, query_grid, feat, feat_grid) -> torch.Tensor:
    """DeformableAttention.forward written out with independent reference points and the loop sampler."""
    B, Nq, _ = query.shape
    Hq, Wq = query_grid
    Hk, Wk = feat_grid
    heads, P = attn.num_heads, attn.num_points
    value = attn.value_proj(feat).view(B, Hk * Wk, heads, -1)
    offsets = attn.sampling_offsets(query).view(B, Nq, heads, P, 2)
    weights = attn.attention_weights(query).view(B, Nq, heads, P).softmax(-1)
    centres = torch.tensor([[(n % Wq + 0.5) / Wq, (n // Wq + 0.5) / Hq] for n in range(Nq)])  # (x, y)
    locations = centres[None, :, None, None, :] + offsets / torch.tensor([Wk, Hk])
    return attn.output_proj(reference_sample(value, feat_grid, locations, weights).float())


def test_deformable_sample_matches_loop_reference():
    B, Nq, heads, P, d = 2, 5, 3, 4, 2
    grid = (3, 5)  # non-square so that an x/y mix-up shows
    value = torch.randn(B, grid[0] * grid[1], heads, d)
    locations = torch.rand(B, Nq, heads, P, 2) * 1.6 - 0.3  # partly outside [0, 1]
    weights = torch.rand(B, Nq, heads, P)
    assert (locations < 0).any() and (locations > 1).any()

    out = deformable_sample(value, grid, locations, weights)
    assert tuple(out.shape) == (B, Nq, heads * d)
    expected = reference_sample(value, grid, locations, weights)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_deformable_sample_pixel_centres_and_far_outside():
    grid = (3, 4)
    heads, d = 2, 3
    value = torch.randn(1, 12, heads, d)
    # one query per pixel, sampling exactly at that pixel's centre with weight 1
    ys, xs = torch.meshgrid(torch.arange(3), torch.arange(4), indexing="ij")
    centres = torch.stack([(xs.flatten() + 0.5) / 4, (ys.flatten() + 0.5) / 3], -1)  # (12, 2) as (x, y)
    locations = centres[None, :, None, None, :].expand(1, 12, heads, 1, 2)
    out = deformable_sample(value, grid, locations, torch.ones(1, 12, heads, 1))
    torch.testing.assert_close(out, value.reshape(1, 12, heads * d), atol=1e-6, rtol=0)

    # more than one pixel outside the map in any direction samples nothing
    far = torch.tensor([[-0.6, 0.5], [1.6, 0.5], [0.5, -0.4], [0.5, 1.4]])
    locations = far[None, :, None, None, :].expand(1, 4, heads, 1, 2)
    out = deformable_sample(value, grid, locations, torch.ones(1, 4, heads, 1))
    assert torch.count_nonzero(out) == 0


def test_reference_points_are_cell_centres():
    points = reference_points((2, 3), torch.device("cpu"))
    expected = torch.tensor(
        [[[1 / 6, 1 / 4], [3 / 6, 1 / 4], [5 / 6, 1 / 4], [1 / 6, 3 / 4], [3 / 6, 3 / 4], [5 / 6, 3 / 4]]]
    )
    torch.testing.assert_close(points, expected)


def test_deformable_attention_matches_reference():
    attn = DeformableAttention(dim=8, dim_feat=12, num_heads=2, num_points=3, ratio=0.5)
    with torch.no_grad():  # leave the Deformable DETR init: make offsets and weights depend on the query
        attn.sampling_offsets.weight.normal_(0, 0.5)
        attn.attention_weights.weight.normal_(0, 0.5)
        attn.attention_weights.bias.normal_(0, 0.5)
    query_grid, feat_grid = (2, 3), (3, 5)
    query = torch.randn(2, 6, 8)
    feat = torch.randn(2, 15, 12)
    with torch.no_grad():
        out = attn(query, query_grid, feat, feat_grid)
        expected = reference_attention(attn, query, query_grid, feat, feat_grid)
    assert out.dtype == torch.float32 and tuple(out.shape) == (2, 6, 8)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_heads, num_points", [(4, 3), (8, 4), (3, 2)])
def test_deformable_attention_init(num_heads, num_points):
    attn = DeformableAttention(dim=48, dim_feat=32, num_heads=num_heads, num_points=num_points, ratio=0.5)
    assert attn.value_dim == 24
    assert torch.count_nonzero(attn.sampling_offsets.weight) == 0
    assert torch.count_nonzero(attn.attention_weights.weight) == 0
    assert torch.count_nonzero(attn.attention_weights.bias) == 0
    assert torch.count_nonzero(attn.value_proj.bias) == 0 and torch.count_nonzero(attn.output_proj.bias) == 0

    bias = attn.sampling_offsets.bias.detach().view(num_heads, num_points, 2)
    first = bias[:, 0]
    # first point of each head: max-norm 1, in the direction 2*pi*h / heads
    torch.testing.assert_close(first.abs().amax(-1), torch.ones(num_heads))
    angles = torch.atan2(first[:, 1], first[:, 0]) % (2 * math.pi)
    expected_angles = torch.arange(num_heads) * (2 * math.pi / num_heads)
    assert torch.allclose(torch.cos(angles - expected_angles), torch.ones(num_heads), atol=1e-5)
    # point p sits p + 1 pixels (max-norm) away along the same direction
    for p in range(num_points):
        torch.testing.assert_close(bias[:, p], first * (p + 1))
        torch.testing.assert_close(bias[:, p].abs().amax(-1), torch.full((num_heads,), float(p + 1)))


def test_fresh_deformable_attention_ignores_query_content():
    """With zero offset / weight projections the sampling pattern is fixed: only the key map matters."""
    attn = DeformableAttention(dim=16, dim_feat=16, num_heads=2, num_points=2)
    feat = torch.randn(1, 16, 16)
    with torch.no_grad():
        a = attn(torch.randn(1, 4, 16), (2, 2), feat, (4, 4))
        b = attn(torch.randn(1, 4, 16) * 5, (2, 2), feat, (4, 4))
        c = attn(torch.randn(1, 4, 16), (2, 2), torch.randn(1, 16, 16), (4, 4))
    torch.testing.assert_close(a, b)
    assert (a - c).abs().max() > 1e-3


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
def test_deformable_attention_runs_in_float32_under_autocast(input_dtype):
    attn = DeformableAttention(dim=16, dim_feat=32, num_heads=2, num_points=4)
    with torch.no_grad():
        attn.sampling_offsets.weight.normal_(0, 0.5)
    query = torch.randn(2, 6, 16).to(input_dtype)
    feat = torch.randn(2, 12, 32).to(input_dtype)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = attn(query, (2, 3), feat, (3, 4))
        plain = attn(query.float(), (2, 3), feat.float(), (3, 4))
    assert out.dtype == torch.float32
    # the math ran in float32: same numbers as without autocast (bf16 would be off by ~1e-2)
    torch.testing.assert_close(out, plain, atol=1e-6, rtol=1e-6)


def test_multi_scale_attention_matches_a_loop_over_levels_heads_and_points():
    """DINO's form: 3 levels of different (non-square) shapes, one softmax over levels x points per head."""
    shapes = [(4, 6), (2, 3), (1, 2)]
    heads, levels, points, dim = 2, len(shapes), 3, 8
    attn = DeformableAttention(
        dim, dim_feat=6, num_heads=heads, num_points=points, ratio=1.0, num_levels=levels
    )
    with torch.no_grad():
        attn.sampling_offsets.weight.normal_(0, 0.5)
        attn.attention_weights.weight.normal_(0, 0.5)
    B, Nq = 2, 5
    query = torch.randn(B, Nq, dim)
    reference = torch.rand(B, Nq, levels, 2) * 1.2 - 0.1  # some reference points off the maps
    feat = torch.randn(B, sum(h * w for h, w in shapes), 6)
    with torch.no_grad():
        out = attn.attend(query, reference, feat, shapes)
        value = attn.value_proj(feat).view(B, -1, heads, dim // heads)
        offsets = attn.sampling_offsets(query).view(B, Nq, heads, levels, points, 2)
        weights = attn.attention_weights(query).view(B, Nq, heads, levels * points).softmax(-1)
        weights = weights.view(B, Nq, heads, levels, points)
        expected = torch.zeros(B, Nq, dim, dtype=torch.float64)
        start = 0
        for level, (H, W) in enumerate(shapes):
            locations = reference[:, :, None, level, None, :] + offsets[:, :, :, level] / torch.tensor([W, H])
            level_value = value[:, start : start + H * W]
            expected += reference_sample(level_value, (H, W), locations, weights[:, :, :, level])
            start += H * W
        expected = attn.output_proj(expected.float())
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_multi_scale_init_points_the_same_way_on_every_level():
    attn = DeformableAttention(dim=16, dim_feat=16, num_heads=4, num_points=2, ratio=0.5, num_levels=4)
    bias = attn.sampling_offsets.bias.view(4, 4, 2, 2)  # heads, levels, points, (x, y)
    assert attn.sampling_offsets.out_features == 4 * 4 * 2 * 2
    torch.testing.assert_close(bias, bias[:, :1].expand_as(bias))
    torch.testing.assert_close(bias[:, :, 1], 2 * bias[:, :, 0])  # point p reaches p + 1 pixels out
    with pytest.raises(ValueError, match="built for 4 levels, got 1"):
        attn.attend(torch.zeros(1, 3, 16), torch.zeros(1, 3, 1, 2), torch.zeros(1, 4, 16), [(2, 2)])


def test_the_backend_choice_reaches_every_deformable_attention_and_bad_choices_are_named(monkeypatch) -> None:
    import dataclasses

    from piip.errors import ConfigError
    from piip.models import PIIPBackbone
    from piip.models.backbone.deformable import SAMPLERS, sampler_for, set_deformable_backend
    from piip.run.presets import model_config

    config = dataclasses.replace(model_config("piip_tiny", task="shapes_det"), deformable_backend="torch")
    backbone = PIIPBackbone(config)
    attentions = [m for m in backbone.modules() if isinstance(m, DeformableAttention)]
    assert attentions and {m.backend for m in attentions} == {"torch"}
    cpu = torch.device("cpu")
    assert sampler_for("torch", cpu) is SAMPLERS["torch"]
    assert sampler_for("auto", cpu) is SAMPLERS["torch"]  # auto takes Triton on CUDA only
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError, match="model.deformable_backend=triton: Triton cannot run on cpu"):
        sampler_for("triton", cpu)
    with pytest.raises(ConfigError, match=r"model.deformable_backend: expected one of \['auto'"):
        set_deformable_backend(backbone, "cuda")
