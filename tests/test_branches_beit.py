"""BEiT branches hold relative-position tables at their own window and load them as upstream does.

References come from upstream's code, run by the scripts in benchmarks/official/: its checkpoint loader's
table resampling (`beit_rel_pos.pt`) and its mmdet `BEiT` module's tokens (`beit_uniperceiver_branches.pt`).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

from piip.models.backbone import attention
from piip.models.backbone.config import BranchSpec, WindowConfig
from piip.models.branches.base import UNUSED_BY_OFFICIAL
from piip.models.branches.beit import BeitBranch, resample_rel_pos_table

FIXTURES = Path(__file__).parent / "fixtures" / "official"
TINY = {"embed_dim": 16, "depth": 2, "num_heads": 2, "init_values": 1e-6}
TABLE = "relative_position_bias_table"


def beit_spec(**kwargs) -> BranchSpec:
    return BranchSpec(
        name="beit",
        family="beit",
        timm_model="beitv2_base_patch16_224",
        timm_kwargs=TINY,
        window_pad="tokens",
        **kwargs,
    )


def tables(branch: BeitBranch) -> list[torch.Tensor]:
    return [block.attn.relative_position_bias_table for block in branch.blocks]


def test_resampled_table_equals_upstream_loader():
    fixture = torch.load(FIXTURES / "beit_rel_pos.pt")
    table = fixture["table"]  # (27^2 + 3, 2): a 224 BEiTv2 table with its cls-token rows
    for window, expected in fixture["resampled"].items():
        torch.testing.assert_close(resample_rel_pos_table(table, window), expected, atol=1e-5, rtol=1e-5)
    # what piip did before (bicubic on the fly) is far from it: the comparison above has teeth
    grid = table[:-3].T.reshape(1, 2, 27, 27)
    bicubic = F.interpolate(grid, size=(55, 55), mode="bicubic", align_corners=False).reshape(2, -1).T
    assert (bicubic - fixture["resampled"][28]).abs().max() > 0.5


def test_tables_are_sized_for_each_blocks_window():
    branch = BeitBranch(beit_spec(), window=WindowConfig(size=28, global_every=2))
    windowed, global_ = tables(branch)
    assert windowed.shape == (55 * 55, 2)  # upstream's module: (2w-1)^2 rows, no cls-token rows
    assert global_.shape == (27 * 27, 2)  # a global block keeps the pretrained grid (224 / 16 = 14)


def test_pretrained_file_is_resampled_on_load(tmp_path: Path):
    """A 224 BEiT(v2) file (timm naming = the BEiT release naming) loads with upstream's resampling."""
    source = timm.create_model("beitv2_base_patch16_224", num_classes=0, **TINY).state_dict()
    source = {k: torch.randn_like(v) if k.endswith(TABLE) else v for k, v in source.items()}
    source["blocks.0.attn.relative_position_index"] = torch.zeros(197, 197, dtype=torch.long)  # as released
    torch.save({"model": source}, tmp_path / "beit.pth")
    branch = BeitBranch(beit_spec(pretrained=str(tmp_path / "beit.pth")), window=WindowConfig(28, 2))
    report = branch.load_pretrained()
    assert report.missing == []
    windowed, global_ = tables(branch)
    torch.testing.assert_close(windowed.data, resample_rel_pos_table(source[f"blocks.0.attn.{TABLE}"], 28))
    torch.testing.assert_close(global_.data, source[f"blocks.1.attn.{TABLE}"][:-3])  # cls rows dropped
    torch.testing.assert_close(branch.blocks[1].attn.q_bias.data, source["blocks.1.attn.q_bias"])


def test_window_sized_tables_load_unchanged(tmp_path: Path):
    saved = BeitBranch(beit_spec(), window=WindowConfig(28, 2))
    with torch.no_grad():
        for table in tables(saved):
            table.normal_()
    torch.save(saved.state_dict(), tmp_path / "piip_beit.pth")
    branch = BeitBranch(beit_spec(pretrained=str(tmp_path / "piip_beit.pth")), window=WindowConfig(28, 2))
    assert branch.load_pretrained().missing == []
    for loaded, original in zip(tables(branch), tables(saved), strict=True):
        assert torch.equal(loaded, original)


def test_windows_gather_the_table_without_resampling(monkeypatch: pytest.MonkeyPatch):
    def refuse(*args, **kwargs):
        raise AssertionError("relative-position table resampled at run time")

    branch = BeitBranch(beit_spec(), window=WindowConfig(size=4)).eval()
    monkeypatch.setattr(attention.F, "interpolate", refuse)
    with torch.no_grad():
        out = branch.forward_blocks(branch.embed(torch.randn(1, 3, 96, 80)), 0, 1)
    assert out.x.shape == (1, 6, 5, 16)


def test_official_module_keys_load_strictly_and_reproduce_upstream():
    fixture = torch.load(FIXTURES / "beit_uniperceiver_branches.pt")["beit"]
    official = fixture["state_dict"]
    spec = beit_spec(pretrain_img_size=fixture["config"]["pretrain_img_size"])
    branch = BeitBranch(spec, window=WindowConfig(size=4, global_every=2)).eval()
    converted = branch.from_official(official)
    reported = {k for k in converted if k.startswith(UNUSED_BY_OFFICIAL)}
    assert {k.removeprefix(UNUSED_BY_OFFICIAL).split("|")[0] for k in reported} == {
        k for k in official if k.endswith("relative_position_index")
    }
    branch.load_state_dict({k: v for k, v in converted.items() if k not in reported}, strict=True)
    image = fixture["image"].float() / 127.5 - 1.0
    with torch.no_grad():
        tokens = branch.forward_blocks(branch.embed(image), 0, 1).x.flatten(1, 2)
    torch.testing.assert_close(tokens, fixture["tokens"], atol=1e-4, rtol=1e-4)
