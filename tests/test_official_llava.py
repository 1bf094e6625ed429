"""Golden tests for PIIP-LLaVA: tiny official vision towers (two Hugging Face CLIPs, or CLIP + a timm
ConvNeXt) and the official `TwoBranchMLP` projector (benchmarks/official/llava_fixtures.py) convert to piip's
`PIIPBackbone` + `BranchProjector` and give the official outputs (fp32, |Δ| ≤ 1e-5).

Upstream's tower returns the final patch maps of both branches (x1: CLIP-L at low resolution, x2: the
high-resolution branch), no cls token, no `post_layernorm`: piip's `branch_maps` in reverse branch order.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from piip.models.backbone import PIIPBackbone
from piip.models.backbone.config import BranchSpec, PIIPConfig
from piip.models.convert.llava import PROJECTOR, TOWER, convert_llava_heads, convert_projector, tower_state
from piip.models.convert.official import convert_backbone
from piip.models.heads.llava import BranchProjector
from piip.run.convert import convert_state, fit_problems
from tests.official_fixtures import FIXTURES, interaction_config, read, unpack

CASES = sorted(p.stem for p in FIXTURES.glob("llava_*.pt"))


def branch_spec(name: str, kwargs: dict) -> BranchSpec:
    """An official LLaVA branch as piip's: `clip_hf` -> timm's CLIP ViT (pre-norm, quick-GELU, LN eps 1e-5)
    with the Hugging Face config's sizes; `convnext_timm` -> the same timm ConvNeXt."""
    if kwargs["model_type"] == "convnext_timm":
        return BranchSpec(
            name=name,
            family="convnext",
            timm_model=kwargs["pretrained"],
            interaction_indexes=kwargs["interaction_indexes"],
        )
    clip = kwargs["clip_config"]
    return BranchSpec(
        name=name,
        family="vit",
        timm_model="vit_base_patch16_clip_quickgelu_224",
        timm_kwargs=dict(
            embed_dim=clip["hidden_size"],
            depth=clip["num_hidden_layers"],
            num_heads=clip["num_attention_heads"],
            mlp_ratio=clip["intermediate_size"] / clip["hidden_size"],
            pre_norm=True,
            act_layer=clip["hidden_act"],
        ),
        patch_size=kwargs["patch_size"],
        pretrain_img_size=clip["image_size"],
        norm_eps=clip["layer_norm_eps"],
        window_pad="tokens",
        interaction_indexes=kwargs["interaction_indexes"],
    )


def piip_config(official: dict) -> PIIPConfig:
    """Upstream's branch2 (high resolution) is piip's branch 0; the task's `merge: none, head: none`."""
    branches = [official["branch2"], official["branch1"]]
    return PIIPConfig(
        branches=[branch_spec(f"b{2 - k}", b) for k, b in enumerate(branches)],
        resolutions=[b["img_size"] for b in branches],
        num_interactions=len(official["branch1"]["interaction_indexes"]),
        interaction=interaction_config(official),
        merge="none",
        head="none",
        use_cls_token=True,
    )


def test_both_official_tower_classes_have_a_fixture() -> None:
    assert CASES == ["llava_2branch_clip", "llava_2branch_mix"]
    assert [read(c)["official_backbone"]["model_cls"] for c in CASES] == ["2branch_v1", "2branch_mix"]


@pytest.mark.parametrize("case", CASES)
def test_official_llava_tower_and_projector_match(case: str) -> None:
    record = read(case)
    backbone = PIIPBackbone(piip_config(record["official_backbone"])).eval()
    conversion = convert_backbone(backbone, tower_state(unpack(record["state_dict"])))
    assert conversion.unplaced == []
    assert sorted(conversion.state_dict) == sorted(backbone.state_dict())
    unused = {k.split(".", 1)[1].split(".")[1] for k in conversion.unused}  # e.g. "post_layernorm"
    assert unused <= {"post_layernorm", "head"}, conversion.unused
    assert any("post_layernorm" in k for k in conversion.unused)
    backbone.load_state_dict(conversion.state_dict, strict=True)

    projector = BranchProjector([b.dims[-1] for b in backbone.branches], 64).eval()
    placed, unplaced = convert_projector(unpack(record["projector_state_dict"]), len(backbone.branches))
    assert unplaced == [] and sorted(placed) == sorted(projector.state_dict())
    projector.load_state_dict(placed, strict=True)

    with torch.no_grad():
        maps = backbone(record["inputs"][0].float()).branch_maps
        tokens = projector(maps)
    expected = record["outputs"]  # upstream's (x1, x2): largest model first
    assert [tuple(m.shape) for m in maps[::-1]] == [tuple(e.shape) for e in expected]
    worst = max((m - e).abs().max().item() for m, e in zip(maps[::-1], expected, strict=True))
    assert worst <= 1e-5, f"{case}: tower max |Δ| = {worst:.3g}"
    assert tokens.shape == record["projector_output"].shape
    worst = (tokens - record["projector_output"]).abs().max().item()
    assert worst <= 1e-5, f"{case}: projector max |Δ| = {worst:.3g}"


def test_projector_branches_are_numbered_from_the_highest_resolution() -> None:
    """Upstream's `branch1` (largest model, low resolution) is piip's last MLP; positions 1/3/6 of its
    Sequential are Linear / GroupNorm / Linear; an unknown position is reported, not dropped."""
    state = {
        "branch1.1.weight": torch.zeros(64, 48),
        "branch2.1.weight": torch.zeros(64, 32),
        "branch2.3.bias": torch.zeros(64),
        "branch2.6.weight": torch.zeros(64, 64),
        "branch1.5.weight": torch.zeros(1),
    }
    placed, unplaced = convert_projector(state, 2)
    assert {k: tuple(v.shape) for k, v in placed.items()} == {
        "mlps.1.0.weight": (64, 48),
        "mlps.0.0.weight": (64, 32),
        "mlps.0.1.bias": (64,),
        "mlps.0.3.weight": (64, 64),
    }
    assert unplaced == ["branch1.5.weight"]


def test_llava_heads_keep_the_language_model_names_and_report_the_rest() -> None:
    state = {
        "model.mm_projector.branch2.1.bias": torch.zeros(8),
        "model.embed_tokens.weight": torch.zeros(4, 8),
        "model.layers.0.self_attn.rotary_emb.inv_freq": torch.zeros(2),
        "lm_head.weight": torch.zeros(4, 8),
        "model.image_newline": torch.zeros(8),
        "model.mm_projector.extra": torch.zeros(1),
    }
    placed, unplaced = convert_llava_heads(state, 2)
    assert "projector.mlps.0.0.bias" in placed
    assert "language_model.model.embed_tokens.weight" in placed and "language_model.lm_head.weight" in placed
    assert any(k.startswith("<unused>.model.layers.0.self_attn.rotary_emb") for k in placed)
    # LLaVA's `image_newline` (anyres 'unpad' merging) has no piip counterpart: named, never dropped
    assert sorted(unplaced) == ["model.image_newline", "model.mm_projector.extra"]


def test_llava_layout_checkpoint_converts_through_the_multimodal_task(tmp_path: Path) -> None:
    """The official tower and projector inside LLaVA's `LlavaLlamaForCausalLM` key layout, next to a tiny
    LLaMA: `MultimodalTask.split_official` / `from_official_heads` place every key, and the task's
    `encode_images` then gives upstream's visual tokens."""
    from piip.data.synthetic.language_model import write_tiny_language_model
    from piip.tasks.multimodal import MultimodalTask

    record = read("llava_2branch_clip")
    folder = write_tiny_language_model(
        tmp_path / "lm", ["a"], hidden_size=64, intermediate_size=64, num_layers=1
    )
    task = MultimodalTask(
        backbone=asdict(piip_config(record["official_backbone"])),
        optim={},
        language_model={"path": str(folder)},
    ).eval()
    language_model = {k: torch.randn_like(v) for k, v in task.language_model.state_dict().items()}
    state = {TOWER + k: v for k, v in unpack(record["state_dict"]).items()}
    state |= {PROJECTOR + k: v for k, v in unpack(record["projector_state_dict"]).items()}
    state |= language_model
    conversion = convert_state(task, state)
    assert fit_problems(task, conversion) == []
    assert sorted(conversion.unused) == sorted(
        f"backbone.branch{k}.clip_model.post_layernorm.{p}" for k in (1, 2) for p in ("weight", "bias")
    )
    task.load_state_dict(conversion.state_dict, strict=True)
    assert all(torch.equal(task.language_model.state_dict()[k], v) for k, v in language_model.items())
    with torch.no_grad():
        tokens = task.encode_images(record["inputs"][0].float())
    assert (tokens - record["projector_output"]).abs().max().item() <= 1e-5
