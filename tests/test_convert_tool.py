"""`python -m piip.tools.convert`: an official checkpoint as released -> a piip checkpoint that rebuilds the
model and gives the official outputs; files that do not fit are refused with the mismatches listed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from piip.errors import CheckpointError
from piip.run.checkpoints import load_task_from_checkpoint, read_checkpoint
from piip.run.cli import run_tool
from piip.run.convert import read_official
from piip.tools.convert import main
from tests.official_fixtures import read, unpack

ROOT = Path(__file__).resolve().parents[1]
# The fixture is upstream's classification model in the quick start's shape, with widths 32 and depth 2
# everywhere and position embeddings at each branch's resolution (upstream's classification layout).
TINY = [
    "task=shapes",
    "model.branch1.timm_kwargs.embed_dim=32",
    "model.branch2.timm_kwargs.embed_dim=32",
    "model.branch2.timm_kwargs.depth=2",
    "task.backbone.pos_embed_at_resolution=true",
]


def convert_cli(args: list[str]) -> int:
    """`python -m piip.tools.convert ARGS` in this process: its exit code (user errors: one line, code 1)."""
    with pytest.raises(SystemExit) as exit_:
        run_tool("convert", main, args)
    return exit_.value.code


@pytest.fixture(scope="module")
def official(tmp_path_factory) -> tuple[Path, dict]:
    record = read("e2e_shapes_piip_tiny")
    path = tmp_path_factory.mktemp("official") / "piip_3branch_tiny.pth"
    torch.save({"model": unpack(record["state_dict"]), "epoch": 3}, path)  # the classification code's layout
    return path, record


def test_converted_checkpoint_rebuilds_the_official_model(official, tmp_path, capsys) -> None:
    src, record = official
    out = tmp_path / "converted.ckpt"
    assert convert_cli([str(src), str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    assert "292 tensors" in printed and "branch1.pos_embed[:, 0]" in printed
    checkpoint = read_checkpoint(out)
    assert checkpoint["piip_conversion"]["source"] == str(src.resolve())
    _, _, task = load_task_from_checkpoint(out)
    with torch.no_grad():
        logits = task.eval()(record["inputs"][0].float())
    assert (logits - record["outputs"][0][0]).abs().max().item() <= 1e-5


def test_a_checkpoint_of_another_model_is_refused_with_its_mismatches(official, tmp_path, capsys) -> None:
    src, _ = official
    out = tmp_path / "converted.ckpt"
    assert convert_cli([str(src), str(out), "task=shapes"]) == 1  # piip_tiny as configured: other widths
    error = capsys.readouterr().err
    assert "does not convert to the configured model" in error
    assert "checkpoint (32,) vs model (96,)" in error  # the largest branch: 32 wide here, 96 in piip_tiny
    assert not out.exists()


def test_unknown_official_keys_are_listed(official, tmp_path, capsys) -> None:
    src, record = official
    state = unpack(record["state_dict"]) | {"branch1.extra_norm.weight": torch.ones(32)}
    torch.save({"model": state}, tmp_path / "extra.pth")
    assert convert_cli([str(tmp_path / "extra.pth"), str(tmp_path / "out.ckpt"), *TINY]) == 1
    assert "official key with no place in piip: backbone.branch1.extra_norm.weight" in capsys.readouterr().err


@pytest.mark.parametrize("layout", ["state_dict", "model", "module", "deepspeed_folder", "plain"])
def test_read_official_unwraps_every_released_layout(tmp_path, layout) -> None:
    tensors = {"branch1.pos_embed": torch.zeros(1, 4, 8), "w1": torch.ones(())}
    if layout == "module":
        obj = {"module": {f"module.{k}": v for k, v in tensors.items()}, "buffer_names": []}
    elif layout in ("state_dict", "model"):
        obj = {layout: tensors, "meta": {"epoch": 12, "CLASSES": ("person", "car")}}
    elif layout == "deepspeed_folder":
        obj = {"module": tensors}
    else:
        obj = tensors
    path = tmp_path / (
        "global_step100/mp_rank_00_model_states.pt" if layout == "deepspeed_folder" else "x.pth"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    read = read_official(tmp_path if layout == "deepspeed_folder" else path)
    assert sorted(read) == sorted(tensors)


def test_read_official_names_what_it_expected(tmp_path) -> None:
    torch.save({"meta": {"epoch": 1}}, tmp_path / "no_weights.pth")
    with pytest.raises(CheckpointError, match="no_weights.pth: holds no tensors"):
        read_official(tmp_path / "no_weights.pth")
    with pytest.raises(CheckpointError, match="without mp_rank_00_model_states.pt"):
        read_official(tmp_path)


@pytest.mark.slow
def test_evaluate_py_runs_on_a_converted_checkpoint(official, tmp_path) -> None:
    src, _ = official
    out = tmp_path / "converted.ckpt"
    assert convert_cli([str(src), str(out), *TINY]) == 0
    result = subprocess.run(
        [sys.executable, "evaluate.py", f"ckpt_path={out}", "trainer=cpu", f"paths.root_dir={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert list(out.parent.glob("*results*.json")), "evaluate.py writes a results JSON next to the checkpoint"


@pytest.mark.slow
def test_train_py_starts_from_a_converted_checkpoint(official, tmp_path) -> None:
    src, _ = official
    out = tmp_path / "converted.ckpt"
    assert convert_cli([str(src), str(out), *TINY]) == 0
    run = [
        *TINY,
        f"init_from={out}",
        f"paths.root_dir={tmp_path}",
        "trainer=cpu",
        "logger=none",
        "callbacks.progress_bar=null",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=1",
        "trainer.limit_val_batches=1",
        "task.val_every_n_epochs=1",
        "task.data.num_workers=0",
        "test_after_fit=false",
    ]
    result = subprocess.run([sys.executable, "train.py", *run], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"initialised the model from {out}" in result.stdout + result.stderr
