"""conf/experiment/llava_*.yaml: one file per released PIIP-LLaVA row (PAPER.md §4.4 multimodal table).

Each composes into the two-stage recipe of PAPER.md §6.4 with the paper's global batches, the row's vision
encoder (checked against the params/FLOPs row the paper table test counts) and the right Vicuna size; the
number of visual tokens is read from a meta-device backbone (no weights).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from piip.models.backbone import PIIPBackbone
from piip.models.backbone.config import PIIPConfig
from piip.models.meta import init_free_meta
from piip.run import stages
from piip.run.config import CONF_DIR, backbone_dict, plain
from piip.tasks.optim import OptimConfig
from piip.tools.paper_table import ROWS
from tests.test_train import compose_config

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("llava_*.yaml"))
# PAPER.md §6.3: 32x32 tokens for 512-256, 512-448 and 1024-336, 20x20 for ConvNeXt-B 640-224
VISUAL_TOKENS = {"640_224": 400, "512_256": 1024, "512_448": 1024, "1024_336": 1024}


def test_every_piip_llava_row_has_an_experiment():
    # 5 PIIP-LLaVA 7B rows + PIIP-LLaVA-Plus + 3 13B rows (the LLaVA-1.5 baselines are not PIIP rows)
    assert len(EXPERIMENTS) == 9
    piip_rows = {(r.model, r.resolution) for r in ROWS if r.task == "llava" and r.model.startswith("piip_")}
    covered = set()
    for name in EXPERIMENTS:
        cfg = compose_config("train", Path("/tmp/unused"), [f"experiment={name}"])
        covered.add((cfg.model.name, "_".join(map(str, backbone_dict(cfg)["resolutions"]))))
    assert piip_rows <= covered


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_llava_experiment(name: str, tmp_path: Path):
    cfg = compose_config("train", tmp_path, [f"experiment={name}"])
    assert cfg.experiment_name == name and cfg.task.name == "llava" and cfg.task.kind == "multimodal"
    assert cfg.grad_checkpointing is True and cfg.trainer.precision == "bf16-mixed"
    size = name.rsplit("_", 1)[1]
    assert cfg.task.module.language_model.path.endswith(f"vicuna-{size}-v1.5")

    (first, pretrain), (second, finetune) = stages.stage_configs(cfg)
    assert (first, second) == ("pretrain", "finetune")
    expected = {
        "pretrain": (256, 1e-3, ["projector"], "plain"),
        "finetune": (128, 2e-5, ["projector", "language_model", "vision_tower"], "vicuna_v1"),
    }
    for stage_name, stage in (("pretrain", pretrain), ("finetune", finetune)):
        batch, lr, trainable, template = expected[stage_name]
        trainer = stage.trainer
        assert (
            stage.task.data.batch_size * trainer.devices * trainer.num_nodes * trainer.accumulate_grad_batches
            == batch
        )
        optim = OptimConfig.from_dict(plain(stage.task.optim))
        assert (optim.lr, optim.weight_decay, optim.schedule, optim.warmup_epochs) == (
            lr,
            0.0,
            "cosine",
            0.03,
        )
        assert list(stage.task.module.trainable) == trainable
        assert stage.task.data.template == template and stage.task.data.max_length == 2048
        assert stage.trainer.max_epochs == 1 and stage.trainer.default_root_dir.endswith(stage_name)
    assert finetune.task.data.image_aspect_ratio == "pad"

    backbone = backbone_dict(cfg)
    tag = "_".join(map(str, backbone["resolutions"]))
    assert backbone["merge"] == "none" and backbone["use_cls_token"] is True
    with init_free_meta():
        model = PIIPBackbone(PIIPConfig.from_dict(backbone))
    assert (backbone["resolutions"][0] // model.branches[0].strides[-1]) ** 2 == VISUAL_TOKENS[tag]
    assert any(r.model == cfg.model.name and r.resolution == tag for r in ROWS)
