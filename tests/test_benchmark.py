"""The benchmark tool's report: both models measured in every mode, ratios consistent with the figures,
GFLOPs equal to the flops tool's count. (Speed itself is printed by the tool, never asserted.)"""

from __future__ import annotations

import json

import pytest

from piip.errors import ConfigError
from piip.run.config import compose
from piip.tools import benchmark
from piip.tools.flops import flops_report

FAST = ["task=shapes_det", "warmup=0", "iters=1", "device=cpu"]


def test_report_times_model_and_baseline_and_relates_them(tmp_path, capsys):
    cfg = compose("benchmark", [*FAST, "baseline=piip_tiny", "baseline_resolution='64_48_32'"])
    report = benchmark.run(cfg)
    model, baseline = report["models"]
    assert model["resolutions"] == [128, 96, 64] and baseline["resolutions"] == [64, 48, 32]
    assert model["gflops"] == pytest.approx(flops_report(compose("benchmark", FAST))["gflops"], rel=1e-3)
    for entry in (model, baseline):
        assert set(entry["modes"]) == {"forward", "train"}
        for figures in entry["modes"].values():
            assert figures["latency_ms"] > 0 and figures["peak_memory_mb"] >= 0
            assert figures["images_per_s"] == pytest.approx(1000 / figures["latency_ms"])
    ratios = report["ratios"]
    assert ratios["flops"] == pytest.approx(model["gflops"] / baseline["gflops"])
    assert ratios["paper_flops"] == pytest.approx(model["paper_gflops"] / baseline["paper_gflops"])
    for mode in ("forward", "train"):
        expected = model["modes"][mode]["latency_ms"] / baseline["modes"][mode]["latency_ms"]
        assert ratios[f"{mode}_time"] == pytest.approx(expected)
    benchmark.print_table(report)
    printed = capsys.readouterr().out
    assert f"FLOPs {ratios['flops']:.2f}" in printed and printed.count("piip_tiny") == 4
    json.dumps(report)  # the JSON output is plain data


def test_unknown_mode_and_dtype_are_refused():
    with pytest.raises(ConfigError, match="modes: unknown"):
        benchmark.settings_of(compose("benchmark", [*FAST, "modes=[backward]"]))
    with pytest.raises(ConfigError, match="dtype: expected fp32 or bf16"):
        benchmark.settings_of(compose("benchmark", [*FAST, "dtype=fp16"]))
