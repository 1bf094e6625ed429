"""The memory estimator: its fake-tensor count against real tensors, checkpointing and sharding arithmetic,
the training input it assumes, and its outputs."""

from __future__ import annotations

import json

import pytest

from piip.errors import ConfigError
from piip.run.config import backbone_dict, compose
from piip.tools import memory

DET = ["model=piip_tiny", "task=shapes_det", "batch_size=2"]


@pytest.fixture(scope="module")
def validated() -> dict:
    """piip_tiny with its Mask R-CNN heads, fp32: the estimate and the real-tensor measurement."""
    return memory.estimate(compose("memory", [*DET, "dtype=fp32", "validate=true"]))


@pytest.mark.parametrize("name", ["plain", "checkpointing"])
def test_estimate_matches_bytes_saved_by_real_tensors(validated, name):
    """Fake tensors must save what real tensors save (fp32, no autocast), and the real peak of live tensor
    bytes over forward + backward must lie between the saved activations (all alive when the forward ends)
    and a stated factor of what the estimate adds up (activations + one recomputed unit + gradients)."""
    batch = validated["settings"]["batch_size"]
    acts, measured = validated["activations"][name], validated["measured"][name]
    estimated = acts["constant"] + batch * acts["per_image"]
    assert estimated == pytest.approx(measured["saved"], rel=0.02)
    assert measured["live_after_forward"] == pytest.approx(measured["saved"], rel=0.02)
    added_up = estimated + batch * acts.get("recompute_per_image", 0) + measured["gradients"]
    # measured 0.90 (plain) and 0.87 (checkpointing): gradients and activations never coexist in full;
    # 1.21 at batch 8, where transients inside ops and activation gradients in flight weigh more
    assert estimated < measured["peak_forward_backward"] < 1.35 * added_up


def test_fake_autocast_saves_what_real_autocast_saves():
    """Autocast on fake CPU tensors picks the dtypes real CPU autocast picks (bf16 matmuls, fp32 residual)."""
    report = memory.estimate(compose("memory", [*DET, "dtype=bf16", "validate=true"]))
    for name, acts in report["activations"].items():
        estimated = acts["constant"] + 2 * acts["per_image"]
        assert estimated == pytest.approx(report["measured"][name]["saved"], rel=0.02), name


def test_grad_checkpointing_lowers_the_activations(validated):
    acts = validated["activations"]
    plain, checkpointed = acts["plain"], acts["checkpointing"]
    assert 0 < checkpointed["recompute_per_image"] < checkpointed["per_image"]
    assert checkpointed["per_image"] + checkpointed["recompute_per_image"] < 0.9 * plain["per_image"]
    totals = validated["totals"]
    assert totals["checkpointing"]["ddp"] < totals["plain"]["ddp"]
    assert totals["checkpointing"]["fsdp"] < totals["plain"]["fsdp"]


def test_bf16_saves_fewer_bytes_per_image_and_keeps_weight_copies():
    fp32, bf16 = (memory.estimate(compose("memory", [*DET, f"dtype={d}"])) for d in ("fp32", "bf16"))
    plain32, plain16 = fp32["activations"]["plain"], bf16["activations"]["plain"]
    assert 0.4 < plain16["per_image"] / plain32["per_image"] < 0.85  # the residual stream stays fp32
    assert set(plain16["per_image_by_dtype"]) >= {"bfloat16", "float32"}
    # autocast's bf16 weight copies, saved for backward: 2 B per weight of the linear and conv layers (less
    # the patch embeddings: their input needs no gradient, so nothing saves their weights)
    assert plain16["constant"] == pytest.approx(2 * bf16["params"]["autocast"], rel=0.1)
    assert plain32["constant"] < 0.01 * plain16["constant"]


@pytest.mark.slow  # 11 s
def test_fsdp_shards_the_state_over_devices():
    report = memory.estimate(
        compose("memory", ["model=piip_tiny", "task=imagenet", "devices=4", "batch_size=2"])
    )
    params, state = report["params"], report["state"]
    assert params["frozen"] > 0 and params["ema"] == params["total"]  # unread last interaction; EMA copy
    replicated = params["buffer_bytes"] + 4 * params["ema"]
    sharded = 16 * params["trainable"] + 4 * params["frozen"]
    assert state["ddp"] == sharded + 4 * params["trainable"] + replicated  # + DDP's gradient buckets
    assert state["fsdp"] == pytest.approx(sharded / 4 + replicated)
    eight = memory.state_figures(params, 8, bf16=True)
    assert eight["fsdp"] - replicated == pytest.approx((state["fsdp"] - replicated) / 2)
    assert eight["ddp"] == state["ddp"]
    root = params["total"] - params["in_units"]
    assert (
        state["fsdp_transient"] == 2 * (root + 2 * params["largest_unit"]) + (2 + 4) * params["largest_unit"]
    )
    for name, figures in report["totals"].items():
        per_image = figures["activations_per_image"]
        constant = max(report["activations"]["plain"]["constant"], 2 * params["autocast"])
        assert figures["ddp"] == state["ddp"] + max(constant + 2 * per_image, state["step_ddp"]), name
        assert figures["fsdp"] == state["fsdp"] + max(
            state["fsdp_transient"] + 2 * per_image, state["step_fsdp"]
        )


def test_parameters_counted_on_meta_match_the_built_model():
    cfg = compose("memory", ["model=piip_tiny", "task=shapes_seg"])
    real = memory.build_model(cfg, backbone_dict(cfg), "cpu")
    counts = memory.parameter_counts(memory.build_model(cfg, backbone_dict(cfg)), ema=False)
    assert counts["total"] == sum(p.numel() for p in real.parameters())
    assert hasattr(real, "decode_head") and "UperNet" in memory.head_scope(real)


@pytest.mark.parametrize(
    ("overrides", "batch", "expected"),
    [
        (
            ["model=piip_tsb", "resolution='1568_896_448'"],
            2,
            (1568, 1568),
        ),  # landscape + portrait: long x long
        (["model=piip_tsb", "resolution='1568_896_448'"], 1, (1120, 1568)),  # short 941 padded to 224
        (["experiment=coco_piip_h6b_1024_512"], 2, (1024, 1024)),  # multi-scale up to 1333, then crop 1024
        (["model=piip_tiny", "task=shapes_seg"], 2, (128, 128)),  # the crop
        (["model=piip_tiny", "task=coco", "image_size=[320,480]"], 2, (320, 480)),
    ],
)
def test_training_input_is_the_worst_case_batch(overrides, batch, expected):
    cfg = compose("memory", overrides)
    assert memory.training_input(cfg, backbone_dict(cfg)["resolutions"], batch) == expected


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("dtype=fp16", "dtype: expected one of"),
        ("devices=0", "devices: expected a positive"),
        ("batch_size=0", "batch_size: expected at least 1"),
        ("image_size=[1,2,3]", "image_size: expected"),
    ],
)
def test_bad_settings_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        memory.estimate(compose("memory", ["model=piip_tiny", override]))


def test_outputs_table_markdown_and_json(tmp_path, capsys):
    report = memory.estimate(compose("memory", [*DET, "grad_checkpointing=true"]))
    assert list(report["totals"]) == ["checkpointing"]  # only the asked setting is totalled
    memory.print_table(report)
    printed = capsys.readouterr().out
    assert "piip_tiny" in printed and "estimated on fake tensors" in printed
    row = memory.markdown_row(report)
    assert row.startswith("| piip_tiny | 128/96/64 | 2 x 128x128 |") and row.count("| - ") == 3
    assert len(row.split("|")) == len(memory.MARKDOWN_HEADER.splitlines()[0].split("|"))
    json.dumps(report)  # plain data


@pytest.mark.slow
def test_six_billion_parameter_models_estimate_quickly():
    """PIIP-H6B is built on meta and counted on fake tensors in seconds; DDP cannot hold it on 80 GB."""
    report = memory.estimate(
        compose("memory", ["experiment=coco_piip_h6b_1024_512", "grad_checkpointing=null"])
    )
    assert 6.8e9 < report["params"]["total"] < 7.6e9
    assert report["seconds"]["total"] < 60
    totals = report["totals"]
    assert totals["checkpointing"]["ddp"] > 80 * memory.GIB > totals["checkpointing"]["fsdp"]
