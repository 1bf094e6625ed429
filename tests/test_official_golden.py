"""Golden tests: tiny random-weight models of the official PIIP code (made by
benchmarks/official/make_fixtures.py) convert to piip and give the official outputs (fp32, |Δ| ≤ 1e-5)."""

from __future__ import annotations

import pytest
import torch

from piip.models.backbone import PIIPBackbone
from piip.models.convert.official import convert_backbone
from tests.official_fixtures import FIXTURES, piip_config, read, unpack

CASES = sorted(p.stem for pattern in ("cls_*.pt", "det_*.pt", "seg_*.pt") for p in FIXTURES.glob(pattern))


def test_every_family_has_a_fixture() -> None:
    assert {c.split("_")[0] for c in CASES} == {"cls", "det", "seg"}
    assert {"det_2branch_internvit", "det_4branch_deit", "det_3branch_convnext_regular_fpn"} <= set(CASES)


@pytest.mark.parametrize("case", CASES)
def test_official_fixture_converts_and_matches(case: str) -> None:
    record = read(case)
    backbone = PIIPBackbone(piip_config(record)).eval()
    conversion = convert_backbone(backbone, unpack(record["state_dict"]))
    assert conversion.unplaced == []
    own = backbone.state_dict()
    assert sorted(set(own) - set(conversion.state_dict)) == []
    assert sorted(set(conversion.state_dict) - set(own)) == []
    backbone.load_state_dict(conversion.state_dict, strict=True)
    worst = 0.0
    with torch.no_grad():
        for image, expected in zip(record["inputs"], record["outputs"], strict=True):
            out = backbone(image.float())
            got = out.pyramid if out.pyramid is not None else [out.logits]
            assert [tuple(g.shape) for g in got] == [tuple(e.shape) for e in expected]
            worst = max(worst, *((g - e).abs().max().item() for g, e in zip(got, expected, strict=True)))
    assert worst <= 1e-5, f"{case}: max |Δ| = {worst:.3g}"
