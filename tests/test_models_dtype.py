"""bf16: the backbone runs with bf16 parameters (as FSDP holds them) and under autocast; the deformable
attention keeps float32 math and the pyramid handed to detection heads is float32."""

import pytest
import torch

from piip.models import PIIPBackbone
from piip.models.backbone.deformable import DeformableAttention
from piip.run.presets import model_config


@pytest.fixture
def tiny_detector():
    torch.manual_seed(0)
    model = PIIPBackbone(model_config("piip_tiny", task="coco"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("gamma"):
                param.fill_(0.1)  # make the interactions contribute
    return model


def test_bf16_parameters(tiny_detector):
    model = tiny_detector.to(torch.bfloat16)
    seen = []
    hook = lambda m, i, o: seen.append(o.dtype)
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, DeformableAttention)]
    out = model(torch.randn(2, 3, 128, 128, dtype=torch.bfloat16))
    for handle in handles:
        handle.remove()
    assert seen and set(seen) == {torch.float32}
    assert all(level.dtype == torch.float32 and torch.isfinite(level).all() for level in out.pyramid)
    assert out.branch_maps[0].dtype == torch.bfloat16


def test_autocast_matches_float32(tiny_detector):
    images = torch.randn(2, 3, 128, 128)
    reference = tiny_detector(images).pyramid
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tiny_detector(images).pyramid
    for ref, level in zip(reference, out, strict=True):
        assert level.dtype == torch.float32
        assert (ref - level).abs().max() < 0.05 * ref.abs().max()
