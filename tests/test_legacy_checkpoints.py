"""Checkpoints written by an earlier layout of piip still load (fixtures: tests/fixtures/legacy/README.md).

The classification checkpoint is whole: it must rebuild through the run layer and give the logits it gave when
it was written. For detection, segmentation and PIIP-LLaVA the fixtures hold each checkpoint's
hyper-parameters and state-dict keys with shapes: the module built now from those hyper-parameters must have
exactly those keys and shapes, or `load_weights` would refuse the old file.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from piip.run.build import build_task
from piip.run.checkpoints import load_task_from_checkpoint

LEGACY = Path(__file__).parent / "fixtures" / "legacy"


def test_a_legacy_classification_checkpoint_rebuilds_and_gives_its_logits():
    saved = torch.load(LEGACY / "shapes_cls_logits.pt", weights_only=True)
    _, _, module = load_task_from_checkpoint(LEGACY / "shapes_cls.ckpt")
    torch.manual_seed(saved["input_seed"])
    images = torch.rand(*saved["input_shape"])
    with torch.no_grad():
        logits = module.eval()(images)
    torch.testing.assert_close(logits, saved["logits"], rtol=0, atol=1e-6)


def _regenerate_llava_files(run_config: dict, root: Path) -> None:
    """The tiny language model's vocabulary comes from the generated texts: write them again."""
    from piip.data.synthetic import ensure_llava_layout

    data = run_config["task"]["data"]
    folder = ensure_llava_layout(root, **data["synthetic"])
    data["root"] = data["tokenizer"] = None
    run_config["task"]["module"]["language_model"]["path"] = str(folder / "language_model")


@pytest.mark.parametrize("task", ["shapes_det", "shapes_seg", "shapes_llava"])
def test_a_legacy_checkpoint_fits_the_module_its_hyper_parameters_build_now(task, tmp_path):
    legacy = json.loads((LEGACY / f"{task}_structure.json").read_text())
    hparams = legacy["hyper_parameters"]
    run_config = hparams["run_config"]
    if task == "shapes_llava":
        _regenerate_llava_files(run_config, tmp_path / "shapes_llava")
    module = build_task(OmegaConf.create(run_config), hparams["backbone"], load_pretrained=False)
    built = {k: list(v.shape) for k, v in module.state_dict().items()}
    assert sorted(built) == sorted(legacy["state_dict"])
    assert built == legacy["state_dict"]
