"""`torch.compile` of the backbone: one graph, no break, in inference and in training with activation
checkpointing (interactions, deformable attention, windows, the taps' own autograd function), and the
traced-through-autograd graph computes what eager does. Inductor's code generation is not run here (minutes
on 2 cores); `python -m piip.tools.benchmark ... compile=true` times it."""

from __future__ import annotations

import pytest
import torch

from piip.models import WindowConfig
from tests.test_models_backbone import set_gammas


@pytest.fixture
def tiny_piip(build_piip, vit_spec):
    specs = [vit_spec("b0", 32, depth=2, heads=2), vit_spec("b1", 64, depth=2, heads=2)]
    window = WindowConfig(size=4, global_every=2)
    model = build_piip(specs, [128, 64], head="pyramid", merge="simple_fpn", window=window)
    set_gammas(model, 0.5)
    return model


@pytest.mark.parametrize("train", [False, True], ids=["inference", "train_checkpointed"])
def test_backbone_traces_as_one_graph(tiny_piip, train):
    torch._dynamo.reset()
    tiny_piip.train(train)
    tiny_piip.set_grad_checkpointing(train)
    with torch.set_grad_enabled(train):
        explanation = torch._dynamo.explain(tiny_piip)(torch.randn(1, 3, 128, 128))
    reasons = [b.reason for b in explanation.break_reasons]
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, reasons


@pytest.mark.slow  # 9 s
def test_compiled_forward_and_backward_equal_eager(tiny_piip):
    torch._dynamo.reset()
    tiny_piip.train()
    tiny_piip.set_grad_checkpointing(True)
    images = torch.randn(1, 3, 128, 128)

    def step(model) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        out = model(images)
        sum(level.square().mean() for level in out.pyramid).backward()
        grads = [p.grad.clone() for p in tiny_piip.parameters() if p.grad is not None]
        tiny_piip.zero_grad(set_to_none=True)
        return [level.detach() for level in out.pyramid], grads

    eager_out, eager_grads = step(tiny_piip)
    compiled_out, compiled_grads = step(torch.compile(tiny_piip, backend="aot_eager", fullgraph=True))
    assert len(compiled_grads) == len(eager_grads) > 0
    torch.testing.assert_close(compiled_out, eager_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(compiled_grads, eager_grads, rtol=1e-3, atol=1e-5)
