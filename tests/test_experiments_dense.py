"""conf/experiment/{coco,ade20k}_*.yaml: one file per released dense-prediction row (PAPER.md §4.4).

Each experiment composes, runs its task's schedule, has the paper's global batch, builds data and optimiser
settings its classes accept, and builds exactly the backbone that tests/test_paper_table.py counts for its
row of `piip.tools.paper_table.ROWS` (so the params/FLOPs checked against PAPER.md are this backbone's).
Layer-wise lr decay depths are read from `PIIPBackbone.layer_id` on a meta-device model (no weights, fast).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from piip.data.transforms import DetectionAugmentation
from piip.models.backbone import PIIPBackbone
from piip.models.backbone.config import PIIPConfig
from piip.models.heads.mask_rcnn import MaskRCNNConfig
from piip.models.meta import init_free_meta
from piip.run.config import CONF_DIR, backbone_dict, compose, plain
from piip.tasks.optim import OptimConfig
from piip.tools.paper_table import ROWS, PaperRow
from tests.test_train import compose_config

DENSE_TASKS = ("coco", "ade20k")
EXPERIMENTS = sorted(
    p.stem
    for p in (CONF_DIR / "experiment").glob("*.yaml")
    if p.stem.startswith(tuple(f"{t}_" for t in DENSE_TASKS)) and not p.stem.startswith("coco_dino_")
)  # task=coco_dino (DINO, its own schedules and pipeline): tests/test_dino_configs.py

# Experiments without a params/FLOPs row in PAPER.md §4.4 (composes-only against the paper table).
NO_PAPER_ROW = {
    "coco_piip_sbl_1568_1120_672": '"More ViT variants" table: AP only',
    "coco_piip_sbl_mae_1568_1120_672": '"More ViT variants" table: AP only',
    "coco_piip_sbl_dinov2_1568_1120_672": '"More ViT variants" table: AP only',
    "coco_piip_sbl_beitv2_1568_1120_672": '"More ViT variants" table: AP only',
    "coco_piip_lh6b_1536_1024_512": "not a README row (PAPER.md §3.3 config; §4.4 lists it as not published)",
}
GLOBAL_BATCH = {
    "coco_piip_lh6b_1536_1024_512": 32
}  # the bs32 config; every other row: 16 (PAPER.md §3.3/§3.4)

# PAPER.md §3.3/§3.4/§3.7 layer decay per model: (num_layers, stride of each branch in piip's order, i.e.
# highest resolution first; upstream's skip_stride reversed, 1 for the largest branch). None: not checked
# (ConvNeXt branches, which upstream leaves undecayed, PAPER.md §7.6).
LAYER_DECAY: dict[str, tuple[int, list[float | None]] | None] = {
    "convnext_b": None,  # plain AdamW (layer_decay 1.0)
    "vit_b": (12, [1]),
    "vit_l": (24, [1]),
    "internvit_6b": (48, [1]),
    "piip_tsb": (12, [1, 1, 1]),
    "piip_sbl": (24, [2, 2, 1]),
    "piip_sbl_augreg": (24, [2, 2, 1]),
    "piip_sbl_augreg_speedup": (24, [2, 2, 1]),
    "piip_sbl_mae": (24, [2, 2, 1]),
    "piip_sbl_dinov2": (24, [2, 2, 1]),
    "piip_sbl_beitv2": (24, [2, 2, 1]),
    "piip_sbl_uniperceiver": (24, [2, 2, 1]),
    "piip_tsbl": (24, [2, 2, 2, 1]),
    "piip_h6b": (48, [1.5, 1]),
    "piip_h6b_speedup": (48, [1.5, 1]),
    "piip_lh6b": (48, [2.0, 1.5, 1]),
    "piip_ct_cs_cb": (12, [None, None, None]),
    "piip_ct_vs_vb": (12, [None, 1, 1]),
    "piip_ct_cs_vb": (12, [None, None, 1]),
    "piip_ct_vs_cb": (12, [None, 1, None]),
    "piip_vt_cs_vb": (12, [1, None, 1]),
    "piip_vt_cs_cb": (12, [1, None, None]),
    "piip_vt_vs_cb": (12, [1, 1, None]),
}
# Fields that do not shape params/FLOPs (or name local files), left out of the comparison with ROWS.
BRANCH_IGNORED = ("drop_path_rate", "drop_path_schedule", "pretrained", "checkpoint_source")
BACKBONE_IGNORED = ("layer_decay_num_layers", "layer_decay_strides", "attention_backend")


IMAGENET = ([123.675, 116.28, 103.53], [58.395, 57.12, 57.375])  # 0-255 units


def coco_lr_and_rate(model: str) -> tuple[float, float]:
    """lr and layer-decay rate of the row's family (PAPER.md §3.3 "Optimisation / data (det)")."""
    if model.startswith(("piip_ct_", "piip_vt_")):
        return 2e-4, 0.8
    if model in ("vit_b", "vit_l", "internvit_6b"):
        return 1e-4, 0.95
    return {"convnext_b": (1e-4, 1.0), "piip_lh6b": (2e-4, 0.85)}.get(model, (1e-4, 0.85))


def pad_of(model: str) -> int:
    """size_divisible (PAPER.md §3.3 "pad"): 224 DeiT PIIP, 64 baselines and 6B family, 32 ConvNeXt PIIP."""
    if model.startswith(("piip_ct_", "piip_vt_")):
        return 32
    if model in ("vit_b", "vit_l", "internvit_6b", "convnext_b") or "h6b" in model:
        return 64
    return 224


def flops_fields(backbone: dict[str, Any]) -> dict[str, Any]:
    data = {k: v for k, v in backbone.items() if k not in BACKBONE_IGNORED}
    data["branches"] = [{k: v for k, v in b.items() if k not in BRANCH_IGNORED} for b in backbone["branches"]]
    return data


def paper_row(model: str, task: str, resolutions: list[int]) -> PaperRow | None:
    tag = "_".join(str(r) for r in resolutions)
    found = [r for r in ROWS if (r.model, r.task, r.resolution) == (model, task, tag)]
    assert len(found) <= 1, found
    return found[0] if found else None


def test_every_released_dense_row_has_an_experiment():
    assert len(EXPERIMENTS) >= 30
    names = set(EXPERIMENTS)
    for row in ROWS:
        if row.task in DENSE_TASKS:
            assert f"{row.task}_{row.model}_{row.resolution}" in names, row
    assert set(NO_PAPER_ROW) <= names and set(GLOBAL_BATCH) <= names


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_dense_experiment(name: str, tmp_path: Path):
    cfg = compose_config("train", tmp_path, [f"experiment={name}"])
    task = name.split("_")[0]
    assert cfg.experiment_name == name
    assert cfg.task.name == task and cfg.task.kind == {"coco": "detection", "ade20k": "segmentation"}[task]
    backbone = backbone_dict(cfg)
    resolutions = backbone["resolutions"]
    model = cfg.model.name
    assert name == f"{task}_{model}_{'_'.join(map(str, resolutions))}", "file name = task_model_resolution"
    assert resolutions == sorted(resolutions, reverse=True)

    # schedule: Mask R-CNN 1x (12 epochs, steps 8/11, 500 warmup iterations) / UperNet 80k iterations
    optim = OptimConfig.from_dict(plain(cfg.task.optim))
    if task == "coco":
        assert (cfg.trainer.max_epochs, cfg.trainer.max_steps) == (12, -1)
        assert (optim.schedule, optim.step_milestones, optim.warmup_steps) == ("step", [8, 11], 500)
        assert optim.gradient_clip is None
        assert (optim.lr, optim.layer_decay) == coco_lr_and_rate(model)
    else:
        assert (cfg.trainer.max_epochs, cfg.trainer.max_steps) == (-1, 80000)
        assert (optim.schedule, optim.warmup_steps, optim.lr, optim.layer_decay) == ("poly", 1500, 4e-5, 0.95)
    assert optim.weight_decay == 0.05

    # global batch = per-device batch x devices x nodes x accumulation
    trainer = cfg.trainer
    per_step = trainer.devices * trainer.num_nodes * trainer.accumulate_grad_batches
    assert trainer.devices == 8 and cfg.task.data.batch_size * per_step == GLOBAL_BATCH.get(name, 16)

    # the settings reach classes that accept them; pad and normalisation of the row's family (PAPER.md §3.3)
    config = PIIPConfig.from_dict(backbone)
    if task == "coco":
        settings = plain(cfg.task.module.detector)
        assert settings.pop("name") == "mask_rcnn"
        detector = MaskRCNNConfig.from_dict(settings)
        convnext_piip = model.startswith(("piip_ct_", "piip_vt_"))
        assert detector.size_divisible == pad_of(model)
        mean, std = IMAGENET if convnext_piip else ([127.5] * 3, [127.5] * 3)
        assert (detector.image_mean, detector.image_std) == (mean, std)
        data = plain(cfg.task.data)
        keys = ("scale", "train_scales", "detr_crop", "crop", "test_scale", "flip")
        augmentation = DetectionAugmentation.from_config(resolutions[0], **{k: data.get(k) for k in keys})
        augmentation.train_transform(), augmentation.eval_transform()
        if convnext_piip:  # the effective _base_ pipeline (PAPER.md §7.5)
            assert augmentation.scale == (1333, 800) and augmentation.train_scales is None
        elif augmentation.train_scales is None:  # single scale: long = highest branch, short = long·800//1333
            assert augmentation.scale == (resolutions[0], resolutions[0] * 800 // 1333)
        else:  # DETR-style multi-scale + crop of the InternViT-6B rows, scaled by highest resolution / 1024
            assert augmentation.crop == resolutions[0] and augmentation.detr_crop is not None
            assert augmentation.test_scale == max(augmentation.train_scales, key=lambda s: s[1])

    # layer-wise lr decay depths (PAPER.md §3.3 / §3.7), from the backbone's own layer_id
    with init_free_meta():
        net = PIIPBackbone(config)
    if LAYER_DECAY[model] is None:
        assert optim.layer_decay == 1.0
        strides, num_layers = [], net.num_decay_layers
    else:
        num_layers, strides = LAYER_DECAY[model]
    assert net.num_decay_layers == num_layers
    for k, stride in enumerate(strides):
        ids = [net.layer_id(n) for n, _ in net.named_parameters() if n.startswith(f"branches.{k}.")]
        assert max(ids) <= num_layers  # block depths within the decay range
        if stride is not None:
            assert min(i for i in ids if i > 0) == stride and max(ids) == num_layers, (k, stride)

    # the backbone is the one tests/test_paper_table.py counts for this row
    row = paper_row(model, task, resolutions)
    if name in NO_PAPER_ROW:
        assert row is None, f"{name} has a ROWS entry now: drop it from NO_PAPER_ROW"
        return
    assert row is not None, f"{name}: no piip.tools.paper_table.ROWS entry; list it in NO_PAPER_ROW"
    expected = backbone_dict(compose("flops", row.overrides))
    assert flops_fields(backbone) == flops_fields(expected)
