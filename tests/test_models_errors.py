"""Configuration validation: every bad config raises ConfigError at construction and names the field."""

from __future__ import annotations

import pytest

from piip.errors import ConfigError
from piip.models import BranchSpec, InteractionConfig, PIIPBackbone, PIIPConfig, WindowConfig


def two_branches(vit) -> list[BranchSpec]:
    return [vit("small", 32), vit("big", 64)]


# (id, config factory taking the `vit_spec` and `piip_config` fixtures, substrings the message must contain)
CASES = [
    (
        "resolution_count",
        lambda vit, cfg: cfg(two_branches(vit), [128]),
        ["model.resolutions", "small", "big"],
    ),
    (
        "resolutions_not_highest_first",
        lambda vit, cfg: cfg(two_branches(vit), [64, 128]),
        ["model.resolutions", "highest"],
    ),
    (
        "resolution_not_multiple_of_patch",
        lambda vit, cfg: cfg(two_branches(vit), [128, 100]),
        ["model.resolutions[1]", "100", "16"],
    ),
    (
        "convnext_resolution_not_multiple_of_32",
        lambda vit, cfg: cfg(
            [BranchSpec(name="cnx", family="convnext", timm_model="test_convnext"), vit("big", 64)],
            [112, 64],
        ),
        ["model.resolutions[0]", "112", "32"],
    ),
    (
        "width_not_multiple_of_32_for_group_norm",
        # 48 suits the interaction (2 heads divide 48 and 24) but not GroupNorm(32)
        lambda vit, cfg: cfg([vit("small", 32), vit("big", 48)], [128, 64]),
        ["model.merge", "48", "32"],
    ),
    (
        "width_not_multiple_of_32_for_single_branch_pyramid",
        lambda vit, cfg: cfg([vit("solo", 48)], [128]),
        ["48", "32", "pyramid"],
    ),
    (
        "width_vs_interaction_heads",
        lambda vit, cfg: cfg(two_branches(vit), [128, 64], interaction=InteractionConfig(num_heads=3)),
        ["model.interaction.num_heads", "32"],
    ),
    (
        "width_times_ratio_vs_interaction_heads",
        # 32 heads divide 32 and 64 but not 32 * 0.5 = 16
        lambda vit, cfg: cfg(two_branches(vit), [128, 64], interaction=InteractionConfig(num_heads=32)),
        ["model.interaction.num_heads", "ratio"],
    ),
    (
        "interaction_index_lists_of_different_lengths",
        lambda vit, cfg: cfg(
            [
                vit("small", 32, interaction_indexes=[[0, 0], [1, 1]]),
                vit("big", 64, interaction_indexes=[[0, 1]]),
            ],
            [128, 64],
        ),
        ["interaction_indexes", "small: 2", "big: 1"],
    ),
    (
        "interaction_indexes_with_gap",
        lambda vit, cfg: cfg(
            [vit("small", 32, depth=4, interaction_indexes=[[0, 0], [2, 3]]), vit("big", 64)],
            [128, 64],
        ),
        ["model.branches[0] (small).interaction_indexes"],
    ),
    (
        "interaction_indexes_too_short",
        lambda vit, cfg: cfg(
            [vit("small", 32, depth=4, interaction_indexes=[[0, 0], [1, 2]]), vit("big", 64)],
            [128, 64],
        ),
        ["model.branches[0] (small).interaction_indexes", "4 blocks"],
    ),
    (
        "interaction_indexes_too_long",
        lambda vit, cfg: cfg(
            [vit("small", 32, depth=2, interaction_indexes=[[0, 0], [1, 2]]), vit("big", 64)],
            [128, 64],
        ),
        ["model.branches[0] (small).interaction_indexes"],
    ),
    (
        "too_many_interactions_for_depth",
        lambda vit, cfg: cfg(two_branches(vit), [128, 64], num_interactions=3),
        ["3 interaction stages"],
    ),
    (
        "window_with_cls_token",
        lambda vit, cfg: cfg(two_branches(vit), [128, 64], window=WindowConfig(size=4), use_cls_token=True),
        ["model.window", "use_cls_token"],
    ),
    (
        "regular_fpn_without_out_indexes",
        lambda vit, cfg: cfg(two_branches(vit), [128, 64], merge="regular_fpn"),
        ["model.out_interaction_indexes", "regular_fpn"],
    ),
    (
        "regular_fpn_with_two_out_indexes",
        lambda vit, cfg: cfg(
            [vit("small", 32, depth=4), vit("big", 64, depth=4)],
            [128, 64],
            num_interactions=4,
            merge="regular_fpn",
            out_interaction_indexes=[0, 1],
        ),
        ["model.out_interaction_indexes", "[0, 1]"],
    ),
    (
        "out_indexes_without_regular_fpn",
        lambda vit, cfg: cfg(
            two_branches(vit), [128, 64], merge="simple_fpn", out_interaction_indexes=[0, 1, 1]
        ),
        ["model.out_interaction_indexes"],
    ),
    (
        "out_index_past_last_stage",
        lambda vit, cfg: cfg(
            [vit("small", 32, depth=4), vit("big", 64, depth=4)],
            [128, 64],
            num_interactions=4,
            merge="regular_fpn",
            out_interaction_indexes=[0, 1, 4],
        ),
        ["model.out_interaction_indexes", "4"],
    ),
    (
        "pyramid_without_merge",
        lambda vit, cfg: cfg(two_branches(vit), [128, 64], merge="none"),
        ["model.head=pyramid", "merge"],
    ),
    (
        "per_branch_cls_classifier_without_cls_token",
        lambda vit, cfg: cfg(
            two_branches(vit),
            [64, 32],
            head="classification",
            merge="classification",
            classifier="per_branch",
            classifier_token="cls",
            use_cls_token=False,
        ),
        ["model.classifier", "use_cls_token"],
    ),
    (
        "unknown_branch_family",
        lambda vit, cfg: cfg(
            [BranchSpec(name="odd", family="swin", timm_model="test_vit"), vit("big", 64)], [128, 64]
        ),
        ["odd", "family", "swin"],
    ),
    (
        "per_branch_cls_classifier_on_convnext",
        # use_cls_token is fine with a ConvNeXt branch, but it has no cls token to classify
        lambda vit, cfg: cfg(
            [BranchSpec(name="cnx", family="convnext", timm_model="test_convnext"), vit("big", 64)],
            [128, 64],
            head="classification",
            merge="classification",
            use_cls_token=True,
            classifier="per_branch",
            classifier_token="cls",
        ),
        ["model.classifier_token", "cnx"],
    ),
]


@pytest.mark.parametrize("make_config, fragments", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_invalid_config_raises_config_error(vit_spec, piip_config, make_config, fragments):
    with pytest.raises(ConfigError) as info:
        PIIPBackbone(make_config(vit_spec, piip_config))
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_valid_baseline_config_builds(vit_spec, piip_config):
    """Control for the cases above: the same two branches with nothing wrong build fine."""
    model = PIIPBackbone(piip_config(two_branches(vit_spec), [128, 64]))
    assert [b.name for b in model.branches] == ["small", "big"]


BASE_DICT = dict(
    branches=[
        dict(
            name="small",
            family="vit",
            timm_model="test_vit",
            timm_kwargs=dict(embed_dim=32, depth=2, num_heads=1),
        ),
        dict(
            name="big",
            family="vit",
            timm_model="test_vit",
            timm_kwargs=dict(embed_dim=64, depth=2, num_heads=1),
        ),
    ],
    resolutions=[128, 64],
    num_interactions=2,
    interaction=dict(num_heads=2),
)


def test_from_dict_builds_nested_dataclasses():
    config = PIIPConfig.from_dict(BASE_DICT)
    assert isinstance(config.branches[0], BranchSpec) and isinstance(config.interaction, InteractionConfig)
    assert config.interaction.num_heads == 2
    assert PIIPBackbone(config).num_interactions == 2


@pytest.mark.parametrize(
    "patch, fragments",
    [
        (dict(bogus_field=1), ["model", "bogus_field"]),
        (dict(interaction=dict(num_heads=2, nonsense=True)), ["model.interaction", "nonsense"]),
        (dict(window=dict(size=4, stride=2)), ["model.window", "stride"]),
        (
            dict(branches=[dict(BASE_DICT["branches"][0], colour="red"), BASE_DICT["branches"][1]]),
            ["model.branches[0]", "colour"],
        ),
        (dict(branches=[]), ["model.branches"]),
        (
            dict(branches=[dict(name="nofamily", timm_model="test_vit"), BASE_DICT["branches"][1]]),
            ["model.branches[0]", "family"],
        ),
    ],
    ids=[
        "unknown_model_field",
        "unknown_interaction_field",
        "unknown_window_field",
        "unknown_branch_field",
        "no_branches",
        "missing_required_branch_field",
    ],
)
def test_from_dict_rejects_bad_fields(patch, fragments):
    with pytest.raises(ConfigError) as info:
        PIIPConfig.from_dict(BASE_DICT | patch)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
