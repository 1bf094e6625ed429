"""Hydra configs: every released model builds on meta for each task it declares; CLI and config errors."""

import json
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from piip.errors import ConfigError
from piip.models import PIIPBackbone, PIIPConfig
from piip.models.meta import init_free_meta
from piip.run.cli import quote_resolution_overrides
from piip.run.config import CONF_DIR, backbone_dict, compose
from piip.run.presets import model_config

TASK_OF_KIND = {
    "detection": "coco",
    "segmentation": "ade20k",
    "classification": "imagenet",
    "multimodal": "llava",
}
MODELS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))


def _tasks(model: str) -> list[str]:
    by_task = OmegaConf.load(CONF_DIR / "model" / f"{model}.yaml").get("by_task") or {}
    return [TASK_OF_KIND.get(key, key) for key in by_task]


CASES = [(m, t) for m in MODELS for t in _tasks(m)]


def test_every_model_declares_a_task():
    assert all(_tasks(m) for m in MODELS)
    assert len(MODELS) >= 30


@pytest.mark.parametrize(("model", "task"), CASES, ids=[f"{m}-{t}" for m, t in CASES])
def test_model_config_instantiates_on_meta(model, task):
    config = model_config(model, task=task)
    with init_free_meta():
        backbone = PIIPBackbone(config)
    assert len(backbone.branches) == len(config.resolutions)
    assert all(p.is_meta for p in backbone.parameters())
    for branch in backbone.branches:
        if branch.spec.pretrained:
            assert branch.spec.pretrained.startswith(str(compose("flops").paths.pretrained_dir))


def test_branch_order_and_windows_follow_the_paper():
    config = model_config("piip_sbl", task="coco", resolution="1568_896_672")
    assert [b.name for b in config.branches] == ["deit3_s", "deit3_b", "deit3_l"]
    assert config.resolutions == [1568, 896, 672]
    assert config.window.size == 28
    baseline = model_config("vit_b", task="coco")
    assert [baseline.window.window_for_block(i) for i in range(12)].count(None) == 4  # blocks 2, 5, 8, 11


def test_task_specific_settings_override_the_model():
    det = model_config("piip_h6b", task="coco")
    seg = model_config("piip_h6b", task="ade20k")
    assert (det.interaction.with_proj, det.interaction.norm) == (True, "layernorm")
    assert (seg.interaction.with_proj, seg.interaction.norm) == (False, "none")
    assert model_config("piip_h6b", task="coco_dino").resolutions == [1024, 768]


def test_branch_swap_from_the_command_line():
    cfg = compose("flops", ["model=piip_sbl", "task=coco", "branch@model.branch2=mae_l"])
    assert backbone_dict(cfg)["branches"][2]["name"] == "mae_l"


def test_resolution_overrides_are_quoted_for_hydra():
    argv = ["train.py", "-m", "model=piip_tsb", "resolution=1120_896_448,1568_896_448", "task=coco"]
    assert quote_resolution_overrides(argv)[3] == "resolution='1120_896_448','1568_896_448'"
    assert quote_resolution_overrides(["x", "model.resolutions=[1,2]"])[1] == "model.resolutions=[1,2]"


def test_unknown_resolution_and_field_errors_name_the_problem():
    with pytest.raises(Exception, match="1000_500"):
        compose("flops", ["model=piip_tsb", "resolution='1000_500'"])
    with pytest.raises(ConfigError, match="model.resolutions"), init_free_meta():
        PIIPBackbone(model_config("piip_tsb", task="coco", resolution="1024_512"))
    with pytest.raises(ConfigError, match="unknown field"):
        PIIPConfig.from_dict(
            {
                "branches": [{"name": "x", "family": "vit", "timm_model": "test_vit", "depthh": 3}],
                "resolutions": [64],
            }
        )


def test_flops_cli_prints_json():
    out = subprocess.run(
        [sys.executable, "-m", "piip.tools.flops", "model=piip_tiny", "task=coco", "format=json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    report = json.loads(out.strip().splitlines()[-1])
    assert set(report) == {"params_m", "gflops", "paper_params_m", "paper_gflops"}
    assert report["params_m"] > report["paper_params_m"] > 0  # the task backbone has conv merges and FPN taps
