"""What DESIGN.md promises for extending piip: a branch family is one adapter class (its file named like the
family) and a detector is one `Detector` class selected by `task.module.detector.name`; nothing else lists
them, and unknown names fail with the known ones listed."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from piip.errors import ConfigError
from piip.models import PIIPBackbone, build_branch, known_families
from piip.models.branches.vit import ViTBranch
from piip.models.heads.detector import Detector, available, build_detector
from piip.models.heads.mask_rcnn import MaskRCNN
from tests.conftest import make_piip_config, make_vit_spec


def test_the_shipped_families_are_found_without_a_list():
    assert {"vit", "beit", "convnext"} <= set(known_families())


def test_a_new_family_is_one_adapter_class_that_the_backbone_builds_and_checks():
    class StrideEightViT(ViTBranch):
        family = "probe_stride_eight"

        @classmethod
        def input_multiple(cls, spec):
            return 48, "probe multiple"

    spec = dataclasses.replace(make_vit_spec(), family="probe_stride_eight")
    assert isinstance(build_branch(spec), StrideEightViT)
    with pytest.raises(ConfigError, match=r"expected a multiple of 48 \(probe multiple\)"):
        PIIPBackbone(make_piip_config([spec], [64]))
    assert PIIPBackbone(make_piip_config([spec], [96])).branches[0].family == "probe_stride_eight"


def test_an_unknown_family_names_the_branch_and_the_known_families():
    spec = dataclasses.replace(make_vit_spec(name="mine"), family="vitt")
    with pytest.raises(ConfigError, match=r"branch mine: unknown family 'vitt'; expected one of .*'vit'"):
        build_branch(spec)


def test_a_detector_is_selected_by_name_and_unknown_names_list_the_known_ones(tiny_backbone_for_detection):
    backbone = tiny_backbone_for_detection
    detector = build_detector(backbone, 3, {"name": "mask_rcnn", "fpn_channels": 32})
    assert isinstance(detector, MaskRCNN) and isinstance(detector, Detector)
    assert detector.backbone is backbone  # referenced, not registered: its parameters are the heads'
    owned = {id(p) for p in detector.parameters()}
    assert owned and owned.isdisjoint(id(p) for p in backbone.parameters())
    assert "mask_rcnn" in available()
    with pytest.raises(
        ConfigError, match=r"task.module.detector.name: unknown detector 'dinoo'.*'mask_rcnn'"
    ):
        build_detector(backbone, 3, {"name": "dinoo"})


@pytest.fixture
def tiny_backbone_for_detection() -> PIIPBackbone:
    torch.manual_seed(0)
    spec = make_vit_spec(dim=32)
    return PIIPBackbone(make_piip_config([spec], [64], head="pyramid", merge="simple_fpn"))
