"""Memory layout along the backbone: ViT token grids stay token-major from the patch embedding through every
block and interaction, so the branch maps reach the merge and pyramid convs as channels-last views.

A channel-major grid gives the same numbers, several times slower on CPU (each LayerNorm and linear copies
its input, transposed convs take their channel-major path): these tests pin the layout, the benchmark tool
measures the time.
"""

from __future__ import annotations

import torch

from piip.models.backbone.deformable import multi_scale_deformable_sample
from tests.test_models_backbone import set_gammas


def channels_last(t: torch.Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def test_vit_grids_stay_token_major_into_the_merge_and_the_pyramid(build_piip, vit_spec):
    specs = [vit_spec("b0", 32), vit_spec("b1", 32), vit_spec("b2", 64)]
    model = build_piip(specs, [128, 96, 64], head="pyramid", merge="simple_fpn")
    set_gammas(model, 0.5)  # the interactions' outputs reach the states
    seen: dict[str, list[torch.Tensor]] = {}
    model.merge.register_forward_pre_hook(lambda m, args: seen.setdefault("merge", list(args[0])))
    model.pyramid.register_forward_pre_hook(lambda m, args: seen.setdefault("pyramid", list(args[0])))
    with torch.no_grad():
        for branch in model.branches:
            assert branch.embed(torch.randn(2, 3, 64, 64)).x.is_contiguous(), branch.name
        out = model(torch.randn(2, 3, 128, 128))
    assert len(seen["merge"]) == 3 and all(channels_last(m) for m in seen["merge"])
    assert channels_last(seen["pyramid"][0])
    assert all(channels_last(m) for m in out.branch_maps)


def test_deformable_sampling_returns_token_major_output():
    value = torch.randn(2, 6 * 5, 4, 8)
    locations = torch.rand(2, 11, 4, 1, 3, 2)
    weights = torch.rand(2, 11, 4, 1, 3)
    out = multi_scale_deformable_sample(value, [(6, 5)], locations, weights)
    assert out.shape == (2, 11, 32) and out.is_contiguous()
