"""The benchmark tool's report: both models measured in every mode, ratios consistent with the figures,
GFLOPs equal to the flops tool's count; the two models' steps alternate. (Speed itself is printed by the
tool, never asserted.)"""

from __future__ import annotations

import contextlib
import json
import statistics

import pytest

from piip.analysis import side_by_side
from piip.analysis.side_by_side import TimerProcess, _time_modes, round_order
from piip.errors import ConfigError
from piip.run.config import compose
from piip.tools import benchmark
from piip.tools.flops import flops_report

FAST = ["task=shapes_det", "warmup=0", "iters=1", "device=cpu"]
SETTINGS = {"modes": ["forward", "train"], "warmup": 1, "iters": 4, "batch_size": 1}


@pytest.mark.slow  # 27 s of two real timer processes; the schedule and the report logic run with fakes below
def test_report_times_model_and_baseline_and_relates_them(tmp_path, capsys):
    cfg = compose("benchmark", [*FAST, "iters=3", "baseline=piip_tiny", "baseline_resolution='64_48_32'"])
    report = benchmark.run(cfg)
    model, baseline = report["models"]
    assert model["resolutions"] == [128, 96, 64] and baseline["resolutions"] == [64, 48, 32]
    assert model["gflops"] == pytest.approx(flops_report(compose("benchmark", FAST))["gflops"], rel=1e-3)
    for entry in (model, baseline):
        assert set(entry["modes"]) == {"forward", "train"}
        for figures in entry["modes"].values():
            assert len(figures["steps_ms"]) == 3 and figures["peak_memory_mb"] >= 0
            assert figures["latency_ms"] == pytest.approx(statistics.median(figures["steps_ms"]))
            assert figures["images_per_s"] == pytest.approx(1000 / figures["latency_ms"])
    ratios = report["ratios"]
    assert ratios["flops"] == pytest.approx(model["gflops"] / baseline["gflops"])
    assert ratios["paper_flops"] == pytest.approx(model["paper_gflops"] / baseline["paper_gflops"])
    for mode in ("forward", "train"):  # the median of the step-by-step ratios, with their range
        steps = model["modes"][mode]["steps_ms"], baseline["modes"][mode]["steps_ms"]
        pairs = sorted(m / b for m, b in zip(*steps, strict=True))
        assert ratios[f"{mode}_time"] == pytest.approx(pairs[1])
        assert ratios[f"{mode}_time_range"] == pytest.approx([pairs[0], pairs[2]])
    benchmark.print_table(report)
    printed = capsys.readouterr().out
    assert f"FLOPs {ratios['flops']:.2f}" in printed and printed.count("piip_tiny") == 4
    json.dumps(report)  # the JSON output is plain data


def test_unknown_mode_and_dtype_are_refused():
    with pytest.raises(ConfigError, match="modes: unknown"):
        benchmark.settings_of(compose("benchmark", [*FAST, "modes=[backward]"]))
    with pytest.raises(ConfigError, match="dtype: expected fp32 or bf16"):
        benchmark.settings_of(compose("benchmark", [*FAST, "dtype=fp16"]))


class RecordingTimer:
    """Stands in for a timer process: logs every call into a log shared by all timers."""

    def __init__(self, name: str, log: list) -> None:
        self.name, self.log = name, log

    def call(self, method: str, *args):
        self.log.append((self.name, method, *args))
        return {"step": 0.5 if self.name == "A" else 0.25, "peak_mb": 1.0}.get(method)


def test_steps_of_the_two_models_alternate_A_B_then_B_A_after_each_ones_warm_up():
    assert [round_order(2, r) for r in range(3)] == [[0, 1], [1, 0], [0, 1]]
    log: list = []
    figures, times = _time_modes([RecordingTimer("A", log), RecordingTimer("B", log)], SETTINGS)
    forward = [(name, method) for name, method, *args in log if args == ["forward"]]
    assert forward == [("A", "start"), ("A", "step"), ("B", "start"), ("B", "step")] + [
        (name, "step") for name in "ABBAABBA"
    ]
    assert log.index(("A", "start", "train")) > log.index(("B", "step", "forward")) + 6  # modes in turn
    assert times["train"] == [[0.5] * 4, [0.25] * 4]  # warm-up steps are not timed
    assert figures[0]["train"]["latency_ms"] == 500 and figures[1]["forward"]["images_per_s"] == 4


def test_interleave_false_times_one_model_after_the_other(monkeypatch):
    log: list = []

    @contextlib.contextmanager
    def recording_processes(backbones, settings):
        yield [RecordingTimer(b["name"], log) for b in backbones]

    monkeypatch.setattr(side_by_side, "timer_processes", recording_processes)
    backbones = [{"name": "A"}, {"name": "B"}]
    figures, times = side_by_side.time_models(backbones, {**SETTINGS, "interleave": False})
    names = [name for name, method, *_ in log]
    assert names == sorted(names) and len(names) == 2 * 2 * (2 + 1 + 4)  # all of A, then all of B
    assert times["forward"] == [[0.5] * 4, [0.25] * 4] and len(figures) == 2
    figures, times = side_by_side.time_models(backbones, {**SETTINGS, "interleave": True})
    assert times["train"] == [[0.5] * 4, [0.25] * 4]


def test_a_model_that_fails_to_build_is_named_in_the_error():
    settings = {**SETTINGS, "device": "cpu", "compile": False, "grad_checkpointing": False, "dtype": "fp32"}
    with pytest.raises(RuntimeError, match="benchmark of broken failed: .*Error"):
        TimerProcess({"name": "broken", "resolutions": [64]}, settings)
