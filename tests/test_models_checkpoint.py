"""Loading timm-format checkpoints into branches: outputs reproduce timm, resampling, reports and errors."""

from __future__ import annotations

import argparse

import pytest
import timm
import torch
import torch.nn.functional as F

from piip.models import PIIPBackbone, build_branch
from piip.models.branches.checkpoint import LoadReport

DIM = 32


def timm_vit(img_size: int = 224, patch_size: int = 16, embed_dim: int = DIM, **kwargs) -> torch.nn.Module:
    """The same tiny architecture as the `vit_spec` branches, built directly by timm."""
    kwargs.setdefault("num_classes", 0)
    model = timm.create_model(
        "test_vit",
        pretrained=False,
        img_size=img_size,
        patch_size=patch_size,
        embed_dim=embed_dim,
        depth=2,
        num_heads=1,
        **kwargs,
    )
    return model.eval()


def save(obj, path) -> str:
    torch.save(obj, path)
    return str(path)


def test_loaded_branch_reproduces_timm_outputs(vit_spec, tmp_path):
    reference = timm_vit()
    with torch.no_grad():  # make every tensor distinct from a fresh init
        for param in reference.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    path = save(reference.state_dict(), tmp_path / "vit.pth")

    branch = build_branch(vit_spec("tiny", DIM), use_cls_token=True).eval()
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        before = branch.forward_blocks(branch.embed(images), 0, 1)
    report = branch.load_pretrained(path)

    assert isinstance(report, LoadReport) and report.path == path
    assert report.missing == []
    assert set(report.unexpected) == {"norm.weight", "norm.bias"}  # timm's final norm is not part of a branch
    with torch.no_grad():
        state = branch.forward_blocks(branch.embed(images), 0, 1)
        tokens = torch.cat([state.prefix, state.x.flatten(1, 2)], dim=1)
        expected = reference.forward_features(images)
    torch.testing.assert_close(reference.norm(tokens), expected, atol=1e-5, rtol=1e-5)
    assert (before.x - state.x).abs().max() > 1e-3  # loading changed the branch


def test_pos_embed_is_resampled_to_the_branch_grid(vit_spec, tmp_path):
    reference = timm_vit(img_size=64)  # 4x4 grid + cls slot
    stored = reference.pos_embed.detach().clone()
    assert tuple(stored.shape) == (1, 17, DIM)
    path = save(reference.state_dict(), tmp_path / "vit64.pth")

    branch = build_branch(vit_spec("grid", DIM, pretrain_img_size=128))  # 8x8 grid
    branch.load_pretrained(path)
    pos = branch.pos_embed.detach()
    assert tuple(pos.shape) == (1, 65, DIM)
    torch.testing.assert_close(pos[:, :1], stored[:, :1])  # cls slot kept
    grid = stored[:, 1:].reshape(1, 4, 4, DIM).permute(0, 3, 1, 2)
    expected = (
        F.interpolate(grid, size=(8, 8), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
    )
    torch.testing.assert_close(pos[:, 1:], expected, atol=1e-6, rtol=0)


def test_patch14_kernel_is_resized_to_16(vit_spec, tmp_path):
    reference = timm_vit(img_size=224, patch_size=14)  # 16x16 grid, 14x14 kernels
    kernel = reference.patch_embed.proj.weight.detach().clone()
    stored_pos = reference.pos_embed.detach().clone()
    assert tuple(kernel.shape) == (DIM, 3, 14, 14)
    path = save(reference.state_dict(), tmp_path / "vit14.pth")

    branch = build_branch(vit_spec("p14", DIM))  # patch 16 at 224: 14x14 grid
    report = branch.load_pretrained(path)
    assert report.missing == []
    resized = F.interpolate(kernel, size=(16, 16), mode="bicubic", align_corners=False)
    torch.testing.assert_close(branch.patch_embed.proj.weight.detach(), resized, atol=1e-6, rtol=0)
    torch.testing.assert_close(
        branch.patch_embed.proj.bias.detach(), reference.patch_embed.proj.bias.detach()
    )
    grid = stored_pos[:, 1:].reshape(1, 16, 16, DIM).permute(0, 3, 1, 2)
    expected_pos = (
        F.interpolate(grid, size=(14, 14), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
    )
    torch.testing.assert_close(branch.pos_embed.detach()[:, 1:], expected_pos, atol=1e-6, rtol=0)


def test_model_nesting_is_unwrapped_and_head_reported(vit_spec, tmp_path):
    reference = timm_vit(num_classes=10)  # has head.weight / head.bias
    state = reference.state_dict()
    nested = {"model": state, "epoch": 3, "args": argparse.Namespace(lr=0.1)}  # DeiT-style file
    path = save(nested, tmp_path / "deit.pth")

    branch = build_branch(vit_spec("nested", DIM))  # no cls token in use: cls_token is unused too
    report = branch.load_pretrained(path)
    assert {"head.weight", "head.bias", "norm.weight", "norm.bias", "cls_token"} == set(report.unexpected)
    assert report.missing == []
    own = branch.state_dict()
    for key in own:
        torch.testing.assert_close(own[key], state[key], msg=key)


def test_backbone_load_pretrained_uses_spec_paths(vit_spec, build_piip, tmp_path):
    path = save(timm_vit().state_dict(), tmp_path / "small.pth")
    specs = [vit_spec("s", DIM, pretrained=path), vit_spec("b", 64)]
    model: PIIPBackbone = build_piip(specs, [128, 64])
    reports = model.load_pretrained()
    assert list(reports) == ["s"]  # only the branch with a file
    assert reports["s"].path == path


def test_missing_file_names_branch_and_path(vit_spec, tmp_path):
    branch = build_branch(vit_spec("lost_branch", DIM))
    path = tmp_path / "nowhere" / "weights.pth"
    with pytest.raises(FileNotFoundError) as info:
        branch.load_pretrained(str(path))
    assert "lost_branch" in str(info.value)
    assert str(path) in str(info.value)


def test_mismatched_architecture_raises_value_error(vit_spec, tmp_path):
    path = save(timm_vit(embed_dim=64).state_dict(), tmp_path / "wide.pth")
    branch = build_branch(vit_spec("narrow", DIM))
    before = {k: v.clone() for k, v in branch.state_dict().items()}
    with pytest.raises(ValueError, match="narrow") as info:
        branch.load_pretrained(path)
    assert "blocks.0.attn.qkv.weight" in str(info.value)
    for key, value in branch.state_dict().items():  # nothing was half-loaded
        torch.testing.assert_close(value, before[key], msg=key)


def test_convnext_branch_loads_timm_weights_and_reproduces_them(convnext_spec, tmp_path):
    reference = timm.create_model("test_convnext", pretrained=False, num_classes=0).eval()
    with torch.no_grad():
        for param in reference.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    path = save(reference.state_dict(), tmp_path / "convnext.pth")

    branch = build_branch(convnext_spec("cnx")).eval()
    report = branch.load_pretrained(path)
    assert report.missing == []
    assert all(not key.startswith(("stem.", "stages.")) for key in report.unexpected)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        state = branch.forward_blocks(branch.embed(images), 0, branch.depth - 1)
        expected = reference.forward_features(images)  # stem + stages (norm_pre is an identity here)
    torch.testing.assert_close(state.x.permute(0, 3, 1, 2), expected, atol=1e-5, rtol=1e-5)
