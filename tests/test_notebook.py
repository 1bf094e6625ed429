"""notebooks/quickstart.ipynb runs top to bottom in a fresh kernel and prints what it promises.

The kernel is ipykernel's `python3`: its spec runs `python`, which jupyter_client replaces by the
`sys.executable` of this process, so the kernel sees the same environment (and the editable `piip`).
Environment variables set before the kernel starts steer the notebook to a temporary data folder, the small
copy of the data and (by default) no checkpoint.
"""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from piip.data.synthetic.scene import SHAPE_CLASSES

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
NOTEBOOK = NOTEBOOKS / "quickstart.ipynb"

# Paper figures (piip/tools/paper_table.py) bracketing PIIP-SBL (DeiT III S/B/L) at 1568/1120/672 on COCO,
# a row the paper does not list: 493-498 M parameters for every SBL row; 1464 G at 1568/896/672 (a smaller
# middle branch, so fewer FLOPs); 1874 G for AugReg S/B/L at 1568/1120/672, the same widths but windows
# that pad tokens before qkv (more FLOPs than DeiT III's padding of q/k/v).
PAPER_SBL_PARAMS_M = 497
SBL_1568_896_672_GFLOPS = 1464
SBL_AUGREG_1568_1120_672_GFLOPS = 1874


def execute(monkeypatch: pytest.MonkeyPatch, **env: str) -> nbformat.NotebookNode:
    """Run the notebook with cwd = notebooks/ in a kernel started with `env` added to this environment."""
    for name in ("PIIP_ROOT", "PIIP_DATA_DIR", "PIIP_CHECKPOINT", "PIIP_NOTEBOOK_SMALL", "MPLBACKEND"):
        monkeypatch.delenv(name, raising=False)  # a developer's settings must not leak into the run
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    client.execute()  # raises CellExecutionError on the first cell that fails
    return nb


def stdout(nb: nbformat.NotebookNode) -> str:
    return "".join(
        out["text"]
        for cell in nb.cells
        for out in cell.get("outputs", [])
        if out["output_type"] == "stream" and out["name"] == "stdout"
    )


def pngs(nb: nbformat.NotebookNode) -> list[bytes]:
    return [
        base64.b64decode(out["data"]["image/png"])
        for cell in nb.cells
        for out in cell.get("outputs", [])
        if "image/png" in out.get("data", {})
    ]


def prediction(text: str) -> tuple[str, str, list[tuple[str, float]]]:
    """(true class, predicted class, top-3 as (class, probability %)) from the last cell's printout."""
    match = re.search(r"true class: (\w+), predicted: (\w+)\n((?:  \w+ +[\d.]+%\n?){3})", text)
    assert match, text
    top = [(name, float(p)) for name, p in re.findall(r"(\w+) +([\d.]+)%", match[3])]
    return match[1], match[2], top


@pytest.mark.slow  # 31 s; the README's quick start runs the same training
def test_quickstart_runs_without_checkpoint(monkeypatch, tmp_path):
    data_dir = tmp_path / "data"
    nb = execute(
        monkeypatch,
        PIIP_DATA_DIR=str(data_dir),
        PIIP_NOTEBOOK_SMALL="1",
        PIIP_CHECKPOINT=str(tmp_path / "missing.ckpt"),
    )
    text = stdout(nb)

    # 1. PIIP-SBL: both counts printed, the paper-protocol one consistent with the paper's figures
    paper = re.search(r"paper protocol +([\d.]+) +([\d.]+)", text)
    actual = re.search(r"actual backbone +([\d.]+) +([\d.]+)", text)
    assert paper and actual, text
    params_m, gflops = float(paper[1]), float(paper[2])
    assert abs(params_m - PAPER_SBL_PARAMS_M) / PAPER_SBL_PARAMS_M < 0.02, text
    assert SBL_1568_896_672_GFLOPS < gflops < SBL_AUGREG_1568_1120_672_GFLOPS, text
    assert float(actual[1]) > 0 and float(actual[2]) > 0, text
    branches = re.findall(r"branch\d: (\w+) .* at (\d+)x(\d+)", text)
    assert all(h == w for _, h, w in branches), text
    assert [(name, int(h)) for name, h, _ in branches] == [
        ("deit3_s", 1568),
        ("deit3_b", 1120),
        ("deit3_l", 672),
    ], text

    # 2. piip_tiny on a random batch of 2: 8 logits, one map per branch, branches resized 64/48/32
    assert "logits: (2, 8)" in text, text
    assert re.search(r"input 64x64\n.*input 48x48\n.*input 32x32", text), text
    maps = re.search(r"branch_maps: (\[.*\])", text)
    assert maps and maps[1].count("(2, ") == 3, text

    # 3. the small data went to PIIP_DATA_DIR and one image was displayed
    assert sorted(p.name for p in (data_dir / "shapes_imagenet_small" / "val").iterdir()) == sorted(
        SHAPE_CLASSES
    )
    images = pngs(nb)
    assert len(images) == 1 and images[0].startswith(b"\x89PNG"), [len(i) for i in images]

    # 4. random weights, said so; a prediction among the shape classes with a sorted top-3
    assert "random weights" in text and "python train.py" in text, text
    true_class, predicted, top = prediction(text)
    assert true_class in SHAPE_CLASSES and predicted in SHAPE_CLASSES, text
    assert top[0][0] == predicted and all(name in SHAPE_CLASSES for name, _ in top), text
    probs = [p for _, p in top]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 100.1, text


@pytest.mark.slow
def test_quickstart_loads_the_checkpoint_train_py_writes(monkeypatch, tmp_path):
    """`python train.py` (one tiny epoch) under PIIP_ROOT; the notebook finds its best.ckpt by default."""
    tiny = [
        "trainer=cpu",
        "logger=none",
        "callbacks.progress_bar=null",
        "callbacks.model_summary=null",
        "+trainer.enable_progress_bar=false",
        "+trainer.enable_model_summary=false",
        "trainer.max_epochs=1",
        "task.val_every_n_epochs=1",  # the quick start validates every 5 epochs: best.ckpt needs one
        "trainer.num_sanity_val_steps=0",
        "test_after_fit=false",
        "task.data.num_workers=0",
        "task.data.batch_size=8",
        "task.data.synthetic.train_per_class=6",
        "task.data.synthetic.val_per_class=2",
    ]
    env = {**os.environ, "PIIP_ROOT": str(tmp_path), "WANDB_MODE": "disabled"}
    env.pop("PIIP_DATA_DIR", None)
    subprocess.run([sys.executable, "train.py", *tiny], cwd=REPO, env=env, check=True, capture_output=True)
    nb = execute(monkeypatch, PIIP_ROOT=str(tmp_path), PIIP_NOTEBOOK_SMALL="1")
    text = stdout(nb)
    assert f"trained weights from {tmp_path}/outputs/shapes/piip_tiny_64_48_32/checkpoints/best.ckpt" in text
    true_class, predicted, _ = prediction(text)
    assert true_class in SHAPE_CLASSES and predicted in SHAPE_CLASSES, text


def test_committed_notebook_has_no_outputs():
    """Outputs and execution counts stay out of the repository, so diffs show only code and prose."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    code_cells = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code_cells
    for cell in code_cells:
        assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]
