"""PIIPBackbone as training sees it: layer ids for layer-wise lr decay, weight-decay exemptions, activation
checkpointing, parameters no output reads, and the tanh-GELU branches of the fused-MLP rows."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from piip.errors import ConfigError
from piip.models import PIIPBackbone, WindowConfig, build_branch
from tests.test_models_backbone import pyramid_loss, set_gammas


def test_layer_ids_vit_branches(build_piip, vit_spec):
    depths = [2, 2, 4]
    specs = [
        vit_spec("t", 32, depth=depths[0]),
        vit_spec("s", 32, depth=depths[1]),
        vit_spec("b", 64, depth=4),
    ]
    model = build_piip(specs, [128, 96, 64], num_interactions=2)
    num_layers = 4
    assert model.num_decay_layers == num_layers

    seen = {"embed": 0, "block": 0, "new": 0}
    for name, _ in model.named_parameters():
        match = re.match(r"branches\.(\d+)\.(.+)", name)
        if match and match.group(2).startswith(("patch_embed.", "pos_embed", "cls_token")):
            expected, kind = 0.0, "embed"
        elif match and (block := re.match(r"blocks\.(\d+)\.", match.group(2))):
            stride = num_layers / depths[int(match.group(1))]
            expected, kind = (int(block.group(1)) + 1) * stride, "block"
        else:
            expected, kind = float(num_layers + 1), "new"
        assert model.layer_id(name) == pytest.approx(expected), name
        assert model.group_matcher()(name) == pytest.approx(expected), name
        seen[kind] += 1
    assert all(seen.values()), seen

    # spot checks from the docstring: largest branch block i -> i + 1, smaller ones -> (i + 1) * 2
    assert model.layer_id("branches.2.blocks.3.mlp.fc1.weight") == 4
    assert model.layer_id("branches.0.blocks.0.attn.qkv.weight") == 2
    assert model.layer_id("branches.1.blocks.1.norm1.weight") == 4
    assert model.layer_id("branches.0.pos_embed") == 0
    assert model.layer_id("interactions.0.0.small_to_large.ca_gamma") == 5
    assert model.layer_id("merge.weights") == 5


def test_layer_ids_convnext_branch(build_piip, vit_spec, convnext_spec, convnext_stride_stages):
    specs = [convnext_spec("cnx", interaction_indexes=convnext_stride_stages), vit_spec("vb", 64, depth=4)]
    model = build_piip(
        specs, [128, 64], num_interactions=4, merge="regular_fpn", out_interaction_indexes=[0, 1, 2]
    )
    cnx = model.branches[0]
    num_layers = 4
    stride = num_layers / cnx.depth
    # stem -> embedding; downsample layers and stage blocks -> their flattened block index
    assert model.layer_id("branches.0.stem.0.weight") == 0
    assert model.layer_id("branches.0.stages.0.blocks.0.conv_dw.weight") == pytest.approx(1 * stride)
    assert model.layer_id("branches.0.stages.1.downsample.1.weight") == pytest.approx(2 * stride)
    assert model.layer_id("branches.0.stages.2.blocks.3.mlp.fc1.weight") == pytest.approx(9 * stride)
    assert model.layer_id("branches.0.stages.3.blocks.1.gamma") == pytest.approx(12 * stride)

    ids = []
    for name, _ in cnx.named_parameters():
        layer = model.layer_id(f"branches.0.{name}")
        assert layer <= num_layers, f"{name} fell through to the 'new parameters' id"
        ids.append((cnx.block_index(name), layer))
    assert {index for index, _ in ids} == set(range(-1, cnx.depth))
    ordered = [layer for _, layer in sorted(ids)]
    assert ordered == sorted(ordered)


def test_no_weight_decay_names(build_piip, vit_spec):
    specs = [vit_spec("s", 32, depth=4), vit_spec("b", 64, depth=4)]
    model = build_piip(
        specs, [128, 64], num_interactions=4, merge="regular_fpn", out_interaction_indexes=[0, 1, 2]
    )
    names = model.no_weight_decay()
    params = dict(model.named_parameters())
    assert {"branches.0.pos_embed", "branches.1.pos_embed", "merge.weights"} <= names
    gammas = {n for n in params if n.endswith(("ca_gamma", "cffn_gamma"))}
    assert gammas and gammas <= names
    assert {f"intermediate_merges.{i}.weights" for i in range(3)} <= names
    assert "interactions.0.0.small_to_large_proj.weight" not in names
    assert "branches.1.blocks.0.attn.qkv.weight" not in names


# -- 11. activation checkpointing --------------------------------------------------------------------------
def _forward_backward(model: PIIPBackbone, images: torch.Tensor):
    model.zero_grad(set_to_none=True)
    out = model(images)
    pyramid_loss(out).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return [level.detach() for level in out.pyramid], grads


@pytest.mark.parametrize("hybrid", [False, True], ids=["vit", "convnext_hybrid"])
def test_grad_checkpointing_matches(build_piip, vit_spec, convnext_spec, convnext_stride_stages, hybrid):
    if hybrid:
        specs = [
            convnext_spec("cnx", interaction_indexes=convnext_stride_stages),
            vit_spec("vb", 64, depth=4),
        ]
        model = build_piip(
            specs, [128, 64], num_interactions=4, merge="regular_fpn", out_interaction_indexes=[0, 1, 2]
        )
    else:
        specs = [vit_spec("t", 32), vit_spec("s", 32, window_pad="tokens"), vit_spec("b", 64)]
        model = build_piip(specs, [128, 96, 64], window=WindowConfig(size=4))
    set_gammas(model, 0.1)
    images = torch.randn(2, 3, 128, 128)

    calls = {"block": 0, "unit": 0}
    # pre-hooks: the checkpoint recomputation may stop early (before a forward hook would fire)
    model.branches[0].blocks[0].register_forward_pre_hook(
        lambda *_: calls.__setitem__("block", calls["block"] + 1)
    )
    model.interactions[0][0].register_forward_pre_hook(
        lambda *_: calls.__setitem__("unit", calls["unit"] + 1)
    )

    plain_out, plain_grads = _forward_backward(model, images)
    assert calls == {"block": 1, "unit": 1}
    model.set_grad_checkpointing(True)
    ckpt_out, ckpt_grads = _forward_backward(model, images)
    # checkpointing really happened: the block and the interaction unit were recomputed during backward
    assert calls == {"block": 3, "unit": 3}

    for a, b in zip(plain_out, ckpt_out, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert plain_grads.keys() == ckpt_grads.keys()
    assert len(plain_grads) == len(list(model.parameters()))
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("token", ["cls", "first_patch"])
def test_unread_parameters_are_exactly_those_without_gradient(vit_spec, build_piip, token):
    model = build_piip(
        [vit_spec("s", 32), vit_spec("l", 64)],
        [64, 32],
        head="classification",
        classifier="per_branch",
        classifier_token=token,
        use_cls_token=True,
        merge="none",
        num_classes=3,
    ).train()
    model(torch.randn(2, 3, 64, 64)).logits.sum().backward()
    without_grad = {n for n, p in model.named_parameters() if p.grad is None}
    assert set(model.unread_parameters()) == without_grad
    assert bool(without_grad) == (token == "cls")  # the top-left patch token does read the last interaction


# -- upstream's fused MLP ------------------------------------------------------------------------------------
def test_gelu_tanh_branches_compute_upstreams_fused_mlp(vit_spec, convnext_spec):
    """`mlp_activation=gelu_tanh` (upstream mlp_type='fused_mlp'): fc2(gelu_tanh(fc1(x))) in every block;
    the default keeps the exact GELU the pretrained weights were trained with."""
    torch.manual_seed(0)
    tanh_branch = build_branch(vit_spec("t", 32, mlp_activation="gelu_tanh"))
    exact_branch = build_branch(vit_spec("e", 32))
    tanh_branch.load_state_dict(exact_branch.state_dict())
    x = torch.randn(2, 5, 32) * 3
    for tanh_block, exact_block in zip(tanh_branch.blocks, exact_branch.blocks, strict=True):
        mlp = tanh_block.mlp
        expected = mlp.fc2(F.gelu(mlp.fc1(x), approximate="tanh"))
        torch.testing.assert_close(mlp(x), expected, rtol=0, atol=0)
        assert (mlp(x) - exact_block.mlp(x)).abs().max() > 1e-6  # another function (tanh error ~1e-5 here)
    with pytest.raises(ConfigError, match="mlp_activation='gelu_tanh' is a ViT setting"):
        build_branch(convnext_spec("c", mlp_activation="gelu_tanh"))
