"""AdamW groups with layer-wise decay across branches of different depth, and the per-step schedules."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from piip.errors import ConfigError
from piip.models import PIIPBackbone
from piip.tasks.optim import OptimConfig, build_optimizer, build_scheduler, lr_factor, parameter_groups


class Wrapper(nn.Module):
    """A task module: the backbone under `backbone.` plus a head outside it."""

    def __init__(self, backbone: PIIPBackbone) -> None:
        super().__init__()
        self.backbone = backbone
        self.extra_head = nn.Linear(4, 2)


@pytest.fixture
def model(vit_spec, piip_config) -> Wrapper:
    # depths 2 and 4: the 2-block branch gets stride 2 on the 4-layer scale
    config = piip_config(
        [vit_spec("s", 32, depth=2), vit_spec("l", 64, depth=4)],
        [64, 32],
        num_classes=3,
        head="classification",
        merge="classification",
    )
    return Wrapper(PIIPBackbone(config))


def groups_of(model: Wrapper, **optim) -> tuple[dict[str, dict], OptimConfig]:
    config = OptimConfig(**optim)
    backbone = model.backbone
    groups = parameter_groups(
        model, config, backbone.layer_id, backbone.num_decay_layers, backbone.no_weight_decay(), "backbone."
    )
    by_param = {}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in groups:
        for p in group["params"]:
            by_param[names[id(p)]] = group
    return by_param, config


def test_layer_decay_follows_backbone_depth_and_new_modules_get_their_scale(model):
    groups, config = groups_of(model, lr=1.0, layer_decay=0.5, new_module_lr_scale=10.0)
    num_layers = model.backbone.num_decay_layers  # 4: the deepest branch
    assert num_layers == 4
    # block 0 of the 2-block branch sits at depth 2 (stride 2); block 0 of the 4-block branch at depth 1
    small = groups["backbone.branches.0.blocks.0.mlp.fc1.weight"]
    large = groups["backbone.branches.1.blocks.0.mlp.fc1.weight"]
    assert small["lr"] == pytest.approx(0.5 ** (num_layers + 1 - 2))
    assert large["lr"] == pytest.approx(0.5 ** (num_layers + 1 - 1))
    assert groups["backbone.branches.0.patch_embed.proj.weight"]["lr"] == pytest.approx(
        0.5 ** (num_layers + 1)
    )
    interaction = next(n for n in groups if ".interactions." in n and n.endswith("weight"))
    assert groups[interaction]["lr"] == pytest.approx(10.0)
    assert groups["extra_head.weight"]["lr"] == pytest.approx(10.0)


def test_no_weight_decay_on_norms_biases_embeddings_and_gammas(model):
    groups, config = groups_of(model, weight_decay=0.05)
    for name, group in groups.items():
        no_decay = (
            name.endswith(".bias") or "norm" in name or name.endswith(("pos_embed", "cls_token", "_gamma"))
        )
        if no_decay:
            assert group["weight_decay"] == 0.0, name
    assert groups["backbone.branches.1.blocks.0.attn.qkv.weight"]["weight_decay"] == 0.05
    everything, _ = groups_of(model, weight_decay=0.05, decay_norms_and_biases=True)
    assert {g["weight_decay"] for g in everything.values()} == {0.05}


def test_every_trainable_parameter_is_in_exactly_one_group(model):
    config = OptimConfig()
    groups = parameter_groups(model, config, model.backbone.layer_id, 4, set(), "backbone.")
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == sum(1 for p in model.parameters() if p.requires_grad)


def test_warmup_then_cosine_reaches_the_floor():
    config = OptimConfig(schedule="cosine", warmup_steps=10, warmup_start_factor=0.1, min_lr_ratio=0.2)
    factor = lr_factor(config, total_steps=110, steps_per_epoch=10)
    assert factor(0) == pytest.approx(0.1)
    assert factor(5) == pytest.approx(0.55)
    assert factor(10) == pytest.approx(1.0)
    assert factor(60) == pytest.approx(0.2 + 0.8 * 0.5)  # half-way through the cosine
    assert factor(110) == pytest.approx(0.2)


def test_poly_and_step_schedules():
    poly = lr_factor(OptimConfig(schedule="poly", poly_power=2.0), total_steps=100, steps_per_epoch=10)
    assert poly(50) == pytest.approx(0.25)
    step = lr_factor(OptimConfig(schedule="step", step_milestones=[2, 4], step_gamma=0.1), 100, 10)
    assert [step(19), step(20), step(39), step(40)] == pytest.approx([1.0, 0.1, 0.1, 0.01])


def test_warmup_in_epochs_and_scheduler_sets_each_group_lr(model):
    groups, _ = groups_of(model)
    config = OptimConfig(
        lr=1.0, layer_decay=0.5, warmup_epochs=1, warmup_start_factor=0.5, schedule="constant"
    )
    param_groups = parameter_groups(model, config, model.backbone.layer_id, 4, set(), "backbone.")
    initial = [g["lr"] for g in param_groups]
    optimizer = build_optimizer(param_groups, config)
    scheduler = build_scheduler(optimizer, config, total_steps=20, steps_per_epoch=4)["scheduler"]
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.5 * lr for lr in initial])
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx(initial)
    assert math.isclose(max(initial), 1.0)


@pytest.mark.parametrize(
    ("field", "value"), [("schedule", "linear_warmup_sideways"), ("layer_decay", 0.0), ("no_such_field", 1)]
)
def test_bad_optim_values_name_the_field(field, value):
    with pytest.raises(ConfigError, match=f"task.optim.*{field}"):
        OptimConfig.from_dict({field: value})


def test_zero_steps_is_an_error():
    optimizer = torch.optim.AdamW([nn.Parameter(torch.zeros(1))])
    with pytest.raises(ConfigError, match="optimizer steps"):
        build_scheduler(optimizer, OptimConfig(), total_steps=0, steps_per_epoch=1)
