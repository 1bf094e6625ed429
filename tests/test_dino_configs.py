"""conf/task/coco_dino.yaml and conf/experiment/coco_dino_*.yaml: the three DINO rows of PAPER.md §3.3.

Each experiment composes to upstream's config (resolutions, windows, schedule, data statistics, pad and the
DETR-style pipeline scaled as upstream's `int(size * r)`), its backbone builds on the meta device with the
stride-8/16/32 pyramid DINO reads, and it is the backbone tests/test_paper_table.py counts for its row.
The gradient clip of the recipe (task.optim.gradient_clip) is checked to reach the optimizer step.
"""

from __future__ import annotations

import gzip
import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from omegaconf import DictConfig

from piip.data.transforms import DetectionAugmentation
from piip.models.backbone import PIIPBackbone
from piip.models.backbone.config import PIIPConfig
from piip.models.meta import init_free_meta
from piip.run.config import CONF_DIR, backbone_dict, compose, plain
from piip.run.released import BY_EXPERIMENT, HUB
from piip.tasks.base import PIIPTask
from piip.tasks.optim import OptimConfig
from piip.tools.paper_table import ROWS
from tests.official_fixtures import FIXTURES
from tests.test_experiments_dense import IMAGENET, LAYER_DECAY, flops_fields, paper_row
from tests.test_train import compose_config

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("coco_dino_*.yaml"))
HALF = [127.5] * 3
# PAPER.md §3.3 per row: epochs, steps, mean/std, pad, window (size, global every), 6B (FSDP + checkpointing)
ROW = {
    "coco_dino_piip_sbl_384_1792_1120_672": (36, [27, 33], IMAGENET, 224, (24, 3), False),
    "coco_dino_piip_h6b_1024_768": (12, [8, 11], (HALF, HALF), 64, None, True),
    "coco_dino_piip_lh6b_1536_1024_512": (24, [16, 22], (HALF, HALF), 64, None, True),
}
OFFICIAL = {  # upstream config stems (mmdetection/configs/piip/{2,3}branch/)
    "coco_dino_piip_sbl_384_1792_1120_672": "dino_4scale_deit_384_sbl_1792_1120_672_fpn_3x_coco_bs32_ms",
    "coco_dino_piip_h6b_1024_768": "dino_4scale_internvit_h6b_1024_768_fpn_1x_coco_bs32_ms",
    "coco_dino_piip_lh6b_1536_1024_512": "dino_4scale_internvit_lh6b_1536_1024_512_fpn_2x_coco_bs32_ms",
}
DETECTOR = dict(  # upstream's DINOHead / DinoTransformer / CdnQueryGenerator / train_cfg / test_cfg
    name="dino",
    num_queries=900,
    num_encoder_layers=6,
    num_decoder_layers=6,
    dim=256,
    num_heads=8,
    num_levels=4,
    num_points=4,
    ffn_dim=2048,
    num_dn=100,
    label_noise=0.5,
    box_noise=1.0,
    max_detections=300,
    costs={"focal": 2.0, "l1": 5.0, "giou": 2.0},
    loss_weights={"focal": 1.0, "l1": 5.0, "giou": 2.0},
)
# layer decay (num_layers, stride per branch, highest resolution first; PAPER.md §3.3, §3.7)
DECAY = {**LAYER_DECAY, "piip_sbl_384": (24, [2, 2, 1])}
PIPELINE = ("train_scales", "detr_crop", "crop", "test_scale", "scale")  # DINO's own data fields


def upstream_pipeline(r: float) -> dict[str, Any]:
    """Upstream's DETR-style sizes for a top resolution r x 1024, as its configs compute them."""
    long = int(1333 * r)
    return {
        "train_scales": [[long, int(s * r)] for s in range(480, 801, 32)],
        "detr_crop": {
            "scales": [[long, int(s * r)] for s in (400, 500, 600)],
            "crop": [int(384 * r), int(600 * r)],
        },
        "crop": int(1024 * r),
        "test_scale": [long, int(800 * r)],
    }


def test_three_rows_three_experiments_three_listings():
    assert sorted(ROW) == EXPERIMENTS
    dino_rows = [r for r in ROWS if r.task == "coco_dino"]
    assert sorted(f"{r.task}_{r.model}_{r.resolution}" for r in dino_rows) == EXPERIMENTS
    for name, stem in OFFICIAL.items():
        released = BY_EXPERIMENT[name]
        assert released.config_name == stem and (FIXTURES / "listings" / f"{stem}.json.gz").is_file()
        branches = "3branch" if "_lh6b_" in name or "_sbl_" in name else "2branch"
        assert released.official_config == f"mmdetection/configs/piip/{branches}/{stem}.py"
        # upstream's README links the SBL-384 and H6B checkpoints; LH6B has a config only
        expected = None if "_lh6b_" in name else f"{HUB}/detection/{stem}.pth"
        assert released.checkpoint == expected


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_dino_experiment(name: str, tmp_path: Path):
    cfg = compose_config("train", tmp_path, [f"experiment={name}"])
    epochs, steps, (mean, std), pad, window, six_b = ROW[name]
    backbone = backbone_dict(cfg)
    resolutions = backbone["resolutions"]
    model = cfg.model.name
    assert cfg.experiment_name == name == f"coco_dino_{model}_{'_'.join(map(str, resolutions))}"
    assert (cfg.task.name, cfg.task.kind, cfg.task.monitor.metric) == (
        "coco_dino",
        "detection",
        "val/bbox_mAP",
    )

    # AdamW 2e-4 / 0.05, layer decay 0.85, clip 0.1, 500 warmup iterations, step schedule of the row
    optim = OptimConfig.from_dict(plain(cfg.task.optim))
    assert (optim.lr, optim.weight_decay, optim.layer_decay, optim.gradient_clip) == (2e-4, 0.05, 0.85, 0.1)
    assert (optim.schedule, optim.step_milestones, optim.step_gamma) == ("step", steps, 0.1)
    assert (optim.warmup_steps, optim.warmup_start_factor) == (500, 0.001)
    assert (cfg.trainer.max_epochs, cfg.trainer.max_steps) == (epochs, -1)
    assert cfg.trainer.gradient_clip_val is None  # so PIIPTask.configure_gradient_clipping uses the task's
    trainer = cfg.trainer
    per_step = trainer.devices * trainer.num_nodes * trainer.accumulate_grad_batches
    assert cfg.task.data.batch_size == 2 and cfg.task.data.batch_size * per_step == 32  # 16 GPUs x 2
    assert cfg.grad_checkpointing is six_b
    strategy = trainer.get("strategy")
    assert (isinstance(strategy, DictConfig) and strategy._target_.endswith("FSDP2Strategy")) is six_b

    # detector: upstream's settings, and the row's image statistics and pad
    assert cfg.task.module.evaluate_masks is False
    assert plain(cfg.task.module.detector) == {
        **DETECTOR,
        "image_mean": mean,
        "image_std": std,
        "size_divisible": pad,
    }

    # data: the DETR-style pipeline scaled by r = top resolution / 1024, truncated as upstream's int(size * r)
    data = plain(cfg.task.data)
    assert {k: data[k] for k in PIPELINE if k != "scale"} == upstream_pipeline(resolutions[0] / 1024)
    augmentation = DetectionAugmentation.from_config(
        resolutions[0], **{k: data[k] for k in (*PIPELINE, "flip")}
    )
    augmentation.train_transform(), augmentation.eval_transform()
    assert augmentation.flip == 0.5

    # backbone: DINO's pyramid (strides 8/16/32, no stride-4 tap), windows and layer-wise decay depths
    assert backbone["pyramid_strides"] == [8, 16, 32]
    config = PIIPConfig.from_dict(backbone)
    if window is None:
        assert config.window is None
    else:
        assert (config.window.size, config.window.global_every) == window
        blocks = [config.window.window_for_block(i) for i in range(24)]
        assert [i for i, w in enumerate(blocks) if w is None] == list(
            range(2, 24, 3)
        )  # upstream: -1 at 2, 5, …
    with init_free_meta():
        net = PIIPBackbone(config)
    assert net.pyramid.strides == [8, 16, 32]
    assert not [n for n, _ in net.named_parameters() if n.startswith("pyramid.taps.0.")]
    num_layers, strides = DECAY[model]
    assert net.num_decay_layers == num_layers
    for k, stride in enumerate(strides):
        ids = [net.layer_id(n) for n, _ in net.named_parameters() if n.startswith(f"branches.{k}.")]
        assert min(i for i in ids if i > 0) == stride and max(ids) == num_layers, (k, stride)

    # the backbone is the one tests/test_paper_table.py counts for this row
    row = paper_row(model, "coco_dino", resolutions)
    assert row is not None and row.expected_gflops is not None and row.expected_params_m is not None
    assert flops_fields(backbone) == flops_fields(backbone_dict(compose("flops", row.overrides)))


def test_coco_dino_keeps_coco_settings_it_does_not_change(tmp_path: Path):
    """coco_dino stands alone (a merge could not drop Mask R-CNN's detector fields): it must not drift."""
    coco = compose_config("train", tmp_path, ["task=coco"]).task
    dino = compose_config("train", tmp_path, ["task=coco_dino"]).task
    changed = {"name": "coco_dino", "backbone": {**plain(coco.backbone), "pyramid_strides": [8, 16, 32]}}
    for key in set(coco) | set(dino):
        expected = changed.get(key, plain(coco.get(key)))
        if key in ("module", "data", "optim"):
            left, right = plain(coco[key]), plain(dino[key])
            own = {
                "module": ("detector", "evaluate_masks"),
                "data": PIPELINE,
                "optim": ("lr", "gradient_clip"),
            }
            left = {k: v for k, v in left.items() if k not in own[key]}
            right = {k: v for k, v in right.items() if k not in own[key]}
            assert left == right, key
        else:
            assert plain(dino.get(key)) == expected, key


def _head_numel(listing: Path) -> int:
    import json

    keys = json.loads(gzip.decompress(listing.read_bytes()))["keys"]
    return sum(math.prod(shape) for key, shape in keys.items() if not key.startswith("backbone."))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_dino_task_builds_on_meta(name: str, tmp_path: Path):
    """The whole task (backbone + DINO) on the meta device; its detector holds as many weights as upstream's
    neck and DINO head (the official listing), whatever their names."""
    from piip.run.convert import build_on_meta

    cfg = compose_config("train", tmp_path, [f"experiment={name}"])
    task = build_on_meta(cfg)
    assert type(task.detector).name == "dino"
    assert all(p.is_meta for p in task.parameters())
    detector = sum(p.numel() for p in task.detector.parameters())
    assert detector == _head_numel(FIXTURES / "listings" / f"{OFFICIAL[name]}.json.gz")
    # FSDP shards every backbone block and interaction unit and every encoder and decoder layer on its own
    units = {id(u) for u in task.shard_units()}
    layers = [*task.detector.encoder.layers, *task.detector.decoder.layers]
    assert len(layers) == 12 and all(id(layer) in units for layer in layers)
    assert all(id(u) in units for u in task.backbone.shard_units())


class _Probe(torch.optim.SGD):
    """Records the gradient norm the optimizer steps with (after Lightning's clipping)."""

    norms: list[float] = []

    def step(self, closure=None):  # noqa: ANN001 - torch's signature
        loss = closure() if closure is not None else None
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
        super().step()
        return loss


class _Clipped(L.LightningModule):
    """A linear model with PIIPTask's gradient-clipping hook and a recipe's `task.optim`."""

    configure_gradient_clipping = PIIPTask.configure_gradient_clipping

    def __init__(self, clip: float | None) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.optim_config = OptimConfig.from_dict({"gradient_clip": clip})

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return (self.layer(batch[0]) * 1000).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return _Probe(self.parameters(), lr=0.0)


@pytest.mark.parametrize("clip", [0.1, None])
def test_task_gradient_clip_reaches_the_optimizer_step(clip: float | None, tmp_path: Path):
    """trainer.gradient_clip_val stays null: Lightning still calls the task's hook, which clips to the global
    L2 norm the recipe names (task.optim.gradient_clip); without one, gradients pass unclipped."""
    _Probe.norms = []
    data = torch.utils.data.TensorDataset(torch.ones(4, 4))
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(_Clipped(clip), torch.utils.data.DataLoader(data, batch_size=2))
    assert len(_Probe.norms) == 2
    if clip is None:
        assert min(_Probe.norms) > 1.0
    else:
        assert max(_Probe.norms) == pytest.approx(clip, rel=1e-4)
