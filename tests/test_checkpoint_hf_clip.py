"""Hugging Face CLIP folders (`save_pretrained` / `huggingface-cli download`) as branch checkpoints.

A tiny random `CLIPVisionModel` is saved to a folder and loaded into a matching timm CLIP ViT branch with
`checkpoint_format="hf_clip"`; the branch's blocks must then reproduce Hugging Face's hidden states.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel

from piip.models import BranchSpec, build_branch
from piip.models.branches.checkpoint import (
    HF_INDEX_FILES,
    HF_WEIGHT_FILES,
    load_branch_checkpoint,
    read_state_dict,
)

VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=64,
    patch_size=16,
    hidden_act="quick_gelu",
)
BRANCH_DIR = Path(__file__).resolve().parents[1] / "conf" / "branch"


def clip_spec(name: str = "clip", **fields) -> BranchSpec:
    """The timm OpenAI-CLIP ViT (pre-norm, quick-GELU, cls token) shrunk to the shape of `VISION`."""
    return BranchSpec(
        name=name,
        family="vit",
        timm_model="vit_base_patch16_clip_quickgelu_224",
        timm_kwargs=dict(
            embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, pre_norm=True, act_layer="quick_gelu"
        ),
        patch_size=16,
        pretrain_img_size=64,
        norm_eps=1e-5,
        checkpoint_format="hf_clip",
        **fields,
    )


def clip_branch(**fields):
    return build_branch(clip_spec(**fields), use_cls_token=True).eval()


def perturb(model: torch.nn.Module) -> torch.nn.Module:
    """Make every weight non-trivial (HF initialises norms to 1/0 and biases to 0) so no mapping hides."""
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model.eval()


def hf_vision_model() -> CLIPVisionModel:
    return perturb(CLIPVisionModel(CLIPVisionConfig(**VISION)))


def branch_tokens(branch, images: torch.Tensor) -> torch.Tensor:
    """(B, 1 + H*W, C): cls token first, then the patch tokens, after the last block."""
    state = branch.forward_blocks(branch.embed(images), 0, branch.depth - 1)
    return torch.cat([state.prefix, state.x.flatten(1, 2)], dim=1)


@torch.no_grad()
def assert_matches_hf(branch, vision_model: torch.nn.Module) -> None:
    images = torch.randn(2, 3, 64, 64)
    # hidden_states[-1] is the encoder output, before post_layernorm (which the branch does not have)
    expected = vision_model(pixel_values=images, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(branch_tokens(branch, images), expected, atol=1e-5, rtol=1e-5)


def test_vision_model_folder_reproduces_hf_hidden_states(tmp_path):
    hf = hf_vision_model()
    hf.save_pretrained(tmp_path / "clip")
    branch = clip_branch()
    report = load_branch_checkpoint(branch, tmp_path / "clip")
    assert report.missing == []
    assert report.unexpected == ["norm.bias", "norm.weight"]  # post_layernorm: unused by the branch
    assert_matches_hf(branch, hf)


def test_full_clip_model_folder_uses_only_the_vision_tower(tmp_path):
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    text.update(vocab_size=100, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    clip = perturb(CLIPModel(CLIPConfig(text_config=text, vision_config=VISION, projection_dim=16)))
    clip.save_pretrained(tmp_path / "clip")
    assert any(k.startswith("text_model.") for k in read_state_dict(tmp_path / "clip"))
    branch = clip_branch()
    report = branch.load_pretrained(str(tmp_path / "clip"))
    assert report.missing == []
    assert report.unexpected == ["norm.bias", "norm.weight"]  # text tower and projections are dropped
    assert_matches_hf(branch, clip.vision_model)


def test_sharded_folder_loads_every_shard(tmp_path):
    hf = hf_vision_model()
    hf.save_pretrained(tmp_path / "whole")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (tmp_path / "sharded" / "model.safetensors").exists()
    whole, sharded = read_state_dict(tmp_path / "whole"), read_state_dict(tmp_path / "sharded")
    assert sorted(sharded) == sorted(whole)
    for key, value in whole.items():
        torch.testing.assert_close(sharded[key], value, msg=key)
    branch = clip_branch()
    assert load_branch_checkpoint(branch, tmp_path / "sharded").missing == []
    assert_matches_hf(branch, hf)


def test_pytorch_bin_folders_plain_and_sharded(tmp_path):
    hf = hf_vision_model()
    state = {f"vision_model.{k}": v for k, v in hf.state_dict().items()}  # transformers 4.x naming
    state["vision_model.embeddings.position_ids"] = torch.arange(17)[None]  # older files store this buffer
    (tmp_path / "plain").mkdir()
    torch.save(state, tmp_path / "plain" / "pytorch_model.bin")
    (tmp_path / "sharded").mkdir()
    keys = sorted(state)
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2 :])):
        shard = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({k: state[k] for k in part}, tmp_path / "sharded" / shard)
        weight_map.update(dict.fromkeys(part, shard))
    index = tmp_path / "sharded" / "pytorch_model.bin.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for folder in ("plain", "sharded"):
        branch = clip_branch()
        report = load_branch_checkpoint(branch, tmp_path / folder)
        assert report.missing == []
        assert report.unexpected == ["norm.bias", "norm.weight"]
        assert_matches_hf(branch, hf)


def test_empty_folder_names_the_files_looked_for(tmp_path):
    (tmp_path / "clip").mkdir()
    with pytest.raises(ValueError, match="my_clip") as info:
        load_branch_checkpoint(clip_branch(name="my_clip"), tmp_path / "clip")
    message = str(info.value)
    assert str(tmp_path / "clip") in message
    for name in HF_WEIGHT_FILES + HF_INDEX_FILES:
        assert name in message


def test_missing_shard_is_reported(tmp_path):
    hf_vision_model().save_pretrained(tmp_path / "clip", max_shard_size="20KB")
    shard = sorted((tmp_path / "clip").glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        read_state_dict(tmp_path / "clip")


def test_missing_folder_names_branch_path_and_source(tmp_path):
    source = "https://huggingface.co/openai/clip-vit-base-patch16"
    branch = clip_branch(name="lost_clip", checkpoint_source=source)
    path = tmp_path / "nowhere" / "clip-vit-base-patch16"
    with pytest.raises(FileNotFoundError) as info:
        branch.load_pretrained(str(path))
    assert "lost_clip" in str(info.value)
    assert str(path) in str(info.value)
    assert source in str(info.value)


def test_incomplete_attention_projections_are_an_error(tmp_path):
    hf = hf_vision_model()
    state = {k: v for k, v in hf.state_dict().items() if "layers.1.self_attn.k_proj" not in k}
    (tmp_path / "clip").mkdir()
    torch.save(state, tmp_path / "clip" / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"blocks\.1\.attn\.qkv"):
        load_branch_checkpoint(clip_branch(), tmp_path / "clip")


@pytest.mark.parametrize("name", ["clip_b16", "clip_l16_224", "clip_l16_336"])
def test_clip_branch_configs_point_at_hf_folders(name):
    branch = OmegaConf.to_container(OmegaConf.load(BRANCH_DIR / f"{name}.yaml"))
    spec = BranchSpec.from_dict(branch)
    assert spec.checkpoint_format == "hf_clip"
    repo = spec.checkpoint_source.removeprefix("https://huggingface.co/")
    assert spec.pretrained == "${paths.pretrained_dir}/" + repo.split("/")[1]  # a folder, no file suffix
