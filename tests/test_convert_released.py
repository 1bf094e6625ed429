"""Every released experiment converts an official-layout state dict of its exact key names and shapes (the
listings `benchmarks/official/make_fixtures.py` wrote from the official code) with nothing left over."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest
import torch

from piip.run.convert import match
from piip.run.released import HUB, RELEASED, RELEASED_LLAVA
from tests.official_fixtures import FIXTURES


def official_state(config_name: str) -> dict[str, torch.Tensor]:
    listing = json.loads(gzip.decompress((FIXTURES / "listings" / f"{config_name}.json.gz").read_bytes()))
    return {key: torch.empty(shape, device="meta") for key, shape in listing["keys"].items()}


def test_every_listing_belongs_to_an_experiment() -> None:
    listed = {p.name.removesuffix(".json.gz") for p in (FIXTURES / "listings").glob("*.json.gz")}
    assert listed == {r.config_name for r in RELEASED}


# Released models whose keys another default case already converts: the same family at another resolution,
# and five of the seven ConvNeXt/ViT mixes (ct_vs_cb and vt_cs_vb put both branch kinds at every position).
COVERED_BY_ANOTHER = {
    "coco_piip_ct_cs_cb", "coco_piip_ct_vs_vb", "coco_piip_ct_cs_vb", "coco_piip_vt_cs_cb",
    "coco_piip_vt_vs_cb", "coco_vit_l",
}  # fmt: skip


def family(experiment: str) -> str:
    return re.sub(r"(_\d+)+$", "", experiment)


def released_cases() -> list:
    """Every released model; the ones whose key mapping another default case covers are `slow`."""
    seen, cases = set(), []
    for released in RELEASED:
        name = family(released.experiment)
        slow = name in seen or name in COVERED_BY_ANOTHER
        seen.add(name)
        cases.append(pytest.param(released, marks=[pytest.mark.slow] if slow else [], id=released.experiment))
    return cases


def test_every_covered_family_is_released() -> None:
    assert {family(r.experiment) for r in RELEASED} >= COVERED_BY_ANOTHER


@pytest.mark.parametrize("released", released_cases())
def test_released_config_converts_every_key(released) -> None:
    state = official_state(released.config_name)
    run, task, conversion = match(state, [f"experiment={released.experiment}", "logger=none"])
    assert conversion.unplaced == []
    assert sorted(conversion.state_dict) == sorted(task.state_dict())
    if released.experiment.startswith("imagenet"):  # upstream's separate heads read the first patch token
        assert run.task.backbone.classifier_token == "first_patch" and not run.task.optim.ema_decay
    # what upstream holds but never reads: cls-token position slots, ConvNeXt's pooled-output norm, and
    # BEiT's index buffers (piip derives the same index)
    # + upstream's 3-branch DINO models hold a stride-4 tap (fpn1) that their strides-8-32 pyramid never reads
    unread = ("pos_embed[:, 0]", ".convnext_model.layernorm.", "relative_position_index", "fpn1.")
    assert [k for k in conversion.unused if not any(part in k for part in unread)] == []


def test_readme_lists_every_released_checkpoint() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Released checkpoints", 1)[1].split("\n## ", 1)[0]
    for released in RELEASED:
        if released.checkpoint is not None:
            file = released.checkpoint.removeprefix(HUB + "/")
            assert f"| `{released.experiment}` | `{file}` |" in section, released.experiment
    for released in RELEASED_LLAVA:  # Hugging Face repositories
        repository = released.checkpoint.rsplit("/", 1)[-1]
        assert f"| `{released.experiment}` | `{repository}` |" in section, released.experiment
