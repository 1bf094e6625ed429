"""Uni-Perceiver branches: upstream's `UnifiedBertEncoder` as a timm ViT, loaded from its own key names.

The reference tokens come from upstream's module itself (benchmarks/official/beit_uniperceiver_branches.py);
the B/L key listings below are written from upstream's `uniperceiver.py`, which the release files follow.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from piip.models.backbone.config import BranchSpec, WindowConfig
from piip.models.branches.checkpoint import uniperceiver_to_timm
from piip.models.branches.uniperceiver import UniPerceiverBranch
from piip.models.meta import init_free_meta
from piip.run.config import CONF_DIR

FIXTURES = Path(__file__).parent / "fixtures" / "official"
SIZES = [("uniperceiver_b", 12, 768), ("uniperceiver_l", 24, 1024)]  # branch config, depth, width


def tiny_spec(**kwargs) -> BranchSpec:
    return BranchSpec(
        name="uniperceiver",
        family="uniperceiver",
        timm_model="vit_base_patch16_224",
        timm_kwargs={"embed_dim": 16, "depth": 2, "num_heads": 2},
        norm_eps=1e-5,
        window_pad="tokens",
        **kwargs,
    )


def official_keys(depth: int, dim: int) -> dict[str, tuple[int, ...]]:
    """`UnifiedBertEncoder(embed_dim=dim, depth=depth).state_dict()` names and shapes, at 224 pixels."""
    keys = {
        "visual_embed.embeddings_norm.weight": (dim,),
        "visual_embed.embeddings_norm.bias": (dim,),
        "visual_embed.patch_embed.spatial_pos_embed.weight": (196, dim),
        "visual_embed.patch_embed.temporal_pos_embed.weight": (8, dim),
        "visual_embed.patch_embed.proj.weight": (dim, 3, 16, 16),
        "visual_embed.patch_embed.proj.bias": (dim,),
    }
    for i in range(depth):
        keys |= {
            f"layers.{i}.gamma_1": (dim,),
            f"layers.{i}.gamma_2": (dim,),
            f"layers.{i}.self_attn.in_proj.weight": (3 * dim, dim),
            f"layers.{i}.self_attn.in_proj.bias": (3 * dim,),
            f"layers.{i}.self_attn.out_proj.weight": (dim, dim),
            f"layers.{i}.self_attn.out_proj.bias": (dim,),
            f"layers.{i}.linear1.weight": (4 * dim, dim),
            f"layers.{i}.linear1.bias": (4 * dim,),
            f"layers.{i}.linear2.weight": (dim, 4 * dim),
            f"layers.{i}.linear2.bias": (dim,),
            f"layers.{i}.norm1.weight": (dim,),
            f"layers.{i}.norm1.bias": (dim,),
            f"layers.{i}.norm2.weight": (dim,),
            f"layers.{i}.norm2.bias": (dim,),
        }
    return keys


def run(branch: UniPerceiverBranch, image: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return branch.forward_blocks(branch.embed(image.float() / 127.5 - 1.0), 0, 1).x.flatten(1, 2)


def test_official_module_keys_load_strictly_and_reproduce_upstream():
    fixture = torch.load(FIXTURES / "beit_uniperceiver_branches.pt")["uniperceiver"]
    spec = tiny_spec(pretrain_img_size=fixture["config"]["pretrain_img_size"])
    branch = UniPerceiverBranch(spec, window=WindowConfig(size=4, global_every=2)).eval()
    branch.load_state_dict(branch.from_official(fixture["state_dict"]), strict=True)
    torch.testing.assert_close(run(branch, fixture["image"]), fixture["tokens"], atol=1e-4, rtol=1e-4)


def test_release_file_loads_with_checkpoint_format_uniperceiver(tmp_path: Path):
    """The `*_converted.pth` files carry the module's names (upstream loads them into it)."""
    fixture = torch.load(FIXTURES / "beit_uniperceiver_branches.pt")["uniperceiver"]
    official = {f"module.{k}": v for k, v in fixture["state_dict"].items()}  # mmcv strips `module.` too
    torch.save({"model": official}, tmp_path / "uni-perceiver_converted.pth")
    spec = tiny_spec(
        pretrain_img_size=fixture["config"]["pretrain_img_size"],
        pretrained=str(tmp_path / "uni-perceiver_converted.pth"),
        checkpoint_format="uniperceiver",
    )
    branch = UniPerceiverBranch(spec, window=WindowConfig(size=4, global_every=2)).eval()
    report = branch.load_pretrained()
    assert report.missing == [] and report.unexpected == []
    torch.testing.assert_close(run(branch, fixture["image"]), fixture["tokens"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("config", "depth", "dim"), SIZES)
def test_shipped_configs_take_the_release_keys_strictly(config: str, depth: int, dim: int):
    data = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "branch" / f"{config}.yaml"))
    data.pop("pretrained")  # names ${paths.pretrained_dir}
    with init_free_meta():
        branch = UniPerceiverBranch(BranchSpec.from_dict(data), window=WindowConfig(size=28))
    official = {k: torch.empty(shape, device="meta") for k, shape in official_keys(depth, dim).items()}
    branch.load_state_dict(uniperceiver_to_timm(official), strict=True, assign=True)
    assert branch.depth == depth and branch.dim == dim and branch.cls_token is None


def test_built_as_upstream_initialises_it():
    branch = UniPerceiverBranch(tiny_spec())
    norms = [m for m in branch.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 1 + 2 * 2 and all(norm.eps == 1e-5 for norm in norms)  # embeddings_norm + 2/block
    assert branch.patch_embed.proj.bias is not None and branch.pos_embed.shape == (1, 196, 16)
    assert branch.temporal_pos_embed.shape == (8, 16)  # upstream's 8 frames, one parameter as upstream's
    for block in branch.blocks:  # layer scale starts at zero (upstream: torch.zeros)
        assert not block.ls1.gamma.any() and not block.ls2.gamma.any()
