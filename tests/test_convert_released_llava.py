"""Every released PIIP-LLaVA checkpoint's key layout converts to its piip experiment with nothing left over.

The layouts are the listings `benchmarks/official/llava_fixtures.py` wrote from the official code (vision
tower and projector from the official modules, Vicuna from transformers' `LlamaConfig`, all on meta).
The task builds its language model from `paths.pretrained_dir/vicuna-{7b,13b}-v1.5`: here folders with
Vicuna's config (no weights: the task is built on meta) and a tiny tokenizer.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from piip.run.convert import match, read_official
from piip.run.released import RELEASED, RELEASED_LLAVA, for_experiment
from tests.official_fixtures import FIXTURES

LISTINGS = FIXTURES / "listings" / "llava"
VICUNA = {  # PAPER.md §6.4: Vicuna-v1.5 (LLaMA-2 architecture), vocabulary 32000
    "7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, intermediate_size=11008),
    "13b": dict(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, intermediate_size=13824),
}
# what upstream holds but never reads: CLIP's final norm, timm ConvNeXt's classifier head (norm, MLP)
UNREAD = (".clip_model.post_layernorm.", ".convnext_model.head.")


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import LlamaConfig

    from piip.data.synthetic.language_model import write_tiny_language_model

    root = tmp_path_factory.mktemp("pretrained")
    for size, shape in VICUNA.items():
        folder = root / f"vicuna-{size}-v1.5"
        write_tiny_language_model(folder, ["a"], hidden_size=8, intermediate_size=8, num_layers=1)
        LlamaConfig(vocab_size=32000, tie_word_embeddings=False, **shape).save_pretrained(folder)
    return root


def listing(config_name: str) -> dict:
    return json.loads(gzip.decompress((LISTINGS / f"{config_name}.json.gz").read_bytes()))


def official_state(config_name: str) -> dict[str, torch.Tensor]:
    return {key: torch.empty(shape, device="meta") for key, shape in listing(config_name)["keys"].items()}


def test_every_llava_listing_belongs_to_an_experiment() -> None:
    listed = {p.name.removesuffix(".json.gz") for p in LISTINGS.glob("*.json.gz")}
    assert len(listed) == 9 and listed == {r.config_name for r in RELEASED_LLAVA}
    assert not {r.experiment for r in RELEASED} & {r.experiment for r in RELEASED_LLAVA}
    for released in RELEASED_LLAVA:
        assert for_experiment(released.experiment) is released
        assert released.checkpoint.startswith("https://huggingface.co/OpenGVLab/PIIP-LLaVA")
        size = released.experiment.rsplit("_", 1)[1]
        assert released.config_name.lower().endswith(f"_{size}")


@pytest.mark.parametrize("released", RELEASED_LLAVA, ids=[r.experiment for r in RELEASED_LLAVA])
def test_released_llava_converts_every_key(released, pretrained_dir: Path) -> None:
    state = official_state(released.config_name)
    overrides = [f"experiment={released.experiment}", "logger=none", f"paths.pretrained_dir={pretrained_dir}"]
    run, task, conversion = match(state, overrides)
    assert conversion.unplaced == []
    assert sorted(conversion.state_dict) == sorted(task.state_dict())
    assert [k for k in conversion.unused if not any(part in k for part in UNREAD)] == []
    vicuna = [k for k in state if not k.startswith(("model.vision_tower.", "model.mm_projector."))]
    placed = sorted(k for k in conversion.state_dict if k.startswith("language_model."))
    assert placed == sorted(f"language_model.{k}" for k in vicuna)
    hidden = VICUNA[released.experiment.rsplit("_", 1)[1]]["hidden_size"]
    assert task.projector.mlps[0][3].weight.shape == (hidden, hidden)
    # what key shapes cannot show: block ranges, resolutions and interaction settings of the official config
    official = listing(released.config_name)["official_model"]["backbone"]
    backbone = task.backbone
    assert [list(map(list, r)) for r in backbone.stage_ranges] == [
        official[b]["interaction_indexes"] for b in ("branch2", "branch1")
    ]
    assert list(backbone.config.resolutions) == [official[b]["img_size"] for b in ("branch2", "branch1")]
    interaction = backbone.config.interaction
    assert (interaction.num_heads, interaction.num_points, interaction.ratio, interaction.drop_path) == (
        official["deform_num_heads"],
        official["n_points"],
        official["deform_ratio"],
        official["interaction_drop_path_rate"],
    )
    assert backbone.config.use_cls_token and backbone.branches[-1].has_cls_token


def test_read_official_reads_a_sharded_hugging_face_folder(tmp_path: Path) -> None:
    """The released folders: safetensors shards named by `model.safetensors.index.json`."""
    shards = {
        "model-00001-of-00002.safetensors": {"model.embed_tokens.weight": torch.ones(2, 4)},
        "model-00002-of-00002.safetensors": {"lm_head.weight": torch.zeros(2, 4)},
    }
    weight_map = {}
    for name, tensors in shards.items():
        save_file(tensors, str(tmp_path / name))
        weight_map |= dict.fromkeys(tensors, name)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    state = read_official(tmp_path)
    assert sorted(state) == ["lm_head.weight", "model.embed_tokens.weight"]
    assert torch.equal(state["model.embed_tokens.weight"], torch.ones(2, 4))
