"""Building on meta without initialisation keeps what a model is: names, shapes, dtypes, frozen flags."""

import pytest
import torch

from piip.models import PIIPBackbone
from piip.models.meta import init_free_meta
from piip.run.presets import model_config


def describe(model: torch.nn.Module) -> dict:
    return {n: (tuple(p.shape), p.dtype, p.requires_grad, p.is_meta) for n, p in model.named_parameters()} | {
        n: (tuple(b.shape), b.dtype, False, b.is_meta) for n, b in model.named_buffers()
    }


@pytest.mark.parametrize(("model", "task"), [("piip_vt_cs_cb", "coco"), ("piip_tsb", "imagenet")])
def test_same_model_as_a_plain_meta_build(model, task):
    config = model_config(model, task=task)
    with torch.device("meta"):
        plain = PIIPBackbone(config)
    plain.branches[0].requires_grad_(False)
    with init_free_meta():
        fast = PIIPBackbone(config)
        fast.branches[0].requires_grad_(False)  # not a value fill: still applies
    assert describe(fast) == describe(plain)
    assert not any(p.requires_grad for p in fast.branches[0].parameters())


def test_value_fills_on_meta_are_skipped_and_others_run():
    with init_free_meta():
        t = torch.empty(2, 3)
        assert t.copy_(torch.empty(5)) is t  # a plain meta copy_ would refuse the shape
        assert t.clamp_(0, 1) is t
        assert (t + 1).shape == (2, 3) and t.is_meta
    real = torch.zeros(2)
    with init_free_meta():
        real.fill_(3.0)  # tensors that are not meta fill as usual
    assert real.tolist() == [3.0, 3.0]
