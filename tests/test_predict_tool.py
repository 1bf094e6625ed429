"""`python -m piip.tools.predict` on the quick start's own checkpoint, and every tool's errors as one line.

One tiny quick-start checkpoint (1 training step on the embedded shapes data) is trained once for the file.
The tools' entry points run as `python -m` runs them (their `__main__` block), in this process with `runpy`
(imports already paid), besides one real `python -m` of predict and of a Hydra tool.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import runpy
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import train as train_entry
from tests.test_train import train_config

ROOT = Path(__file__).resolve().parents[1]
RANK_LINE = re.compile(r"^  (\d)\. (\S+) +([\d.]+)%$")


@pytest.fixture(scope="module")
def quick_start(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(best.ckpt of a 1-step quick-start run, the embedded data folder it trained on)."""
    root = tmp_path_factory.mktemp("quick_start")
    cfg = train_config(root, root / "data", "trainer.limit_train_batches=1", "test_after_fit=false")
    train_entry.train(cfg)
    return root / "run" / "checkpoints" / "best.ckpt", root / "data" / "shapes_imagenet"


def run_module(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


@contextlib.contextmanager
def logging_kept() -> Iterator[None]:
    """Undo what a Hydra tool's `hydra/job_logging: disabled` does to this process: it disables every
    existing logger and sets the root to ERROR, which later tests reading logs would inherit."""
    loggers = [lg for lg in logging.root.manager.loggerDict.values() if isinstance(lg, logging.Logger)]
    disabled = [lg.disabled for lg in loggers]
    level, handlers = logging.root.level, list(logging.root.handlers)
    try:
        yield
    finally:
        for logger, was in zip(loggers, disabled, strict=True):
            logger.disabled = was
        logging.root.setLevel(level)
        logging.root.handlers[:] = handlers


def run_in_process(module: str, *args: str, monkeypatch, capsys) -> tuple[int, str]:
    """(exit code, stderr) of `python -m piip.tools.<module> args`, as the interpreter would report them."""
    monkeypatch.setattr(sys, "argv", [module, *args])
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    code: object = 0
    with warnings.catch_warnings(), logging_kept():
        warnings.filterwarnings("ignore", "'piip.tools", RuntimeWarning)  # runpy: imported before, run again
        try:
            runpy.run_module(f"piip.tools.{module}", run_name="__main__", alter_sys=True)
        except SystemExit as exit_:
            code = exit_.code
    err = capsys.readouterr().err
    if isinstance(code, str):  # the interpreter prints a SystemExit message on stderr and exits 1
        err, code = err + code + "\n", 1
    return int(code or 0), err


def assert_one_line(tool: str, code: int, err: str, *expected: str) -> None:
    lines = err.strip().splitlines()
    assert code != 0, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert re.match(rf"^(python -m piip\.tools\.)?{tool}: error: ", lines[0]), err
    for text in expected:
        assert text in lines[0], err


def test_predict_prints_the_top5_and_writes_the_captioned_image(quick_start, tmp_path):
    ckpt, data = quick_start
    classes = sorted(p.name for p in (data / "val").iterdir())
    image = sorted((data / "val" / classes[0]).iterdir())[0]
    result = run_module("piip.tools.predict", f"ckpt_path={ckpt}", f"image={image}", f"output={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [RANK_LINE.match(line) for line in result.stdout.splitlines()]
    ranking = [(int(m[1]), m[2], float(m[3])) for m in ranks if m]
    assert [r for r, _, _ in ranking] == [1, 2, 3, 4, 5]
    assert {name for _, name, _ in ranking} <= set(classes)  # named by the checkpoint, not "class 3"
    scores = [p for _, _, p in ranking]
    assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 100.01

    written = tmp_path / f"{image.stem}_shapes.png"
    assert result.stdout.strip().splitlines()[-1] == str(written)
    drawn = np.asarray(Image.open(written).convert("RGB"))
    original = np.asarray(Image.open(image).convert("RGB"))
    height, width = original.shape[:2]
    assert drawn.shape[0] > height and drawn.shape[1] >= width  # a caption band below the image
    assert np.array_equal(drawn[:height, :width], original)  # the picture itself at its own size
    band = drawn[height:]
    assert (band < 128).any() and (band > 128).any()  # dark text on the light band


def test_predict_in_process_uses_the_validation_transform_and_names_classes(quick_start, tmp_path):
    from piip.tools import predict

    ckpt, data = quick_start
    image = next((data / "val").rglob("*.JPEG"))
    assert predict.predict(str(ckpt), str(image), output=str(tmp_path), device="cpu")
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert saved["class_names"] == sorted(p.name for p in (data / "val").iterdir())


def test_predict_refuses_a_file_that_is_not_an_image_in_one_line(quick_start, tmp_path, monkeypatch, capsys):
    ckpt, _ = quick_start
    fake = tmp_path / "notes.png"
    fake.write_text("not a picture")
    code, err = run_in_process(
        "predict", f"ckpt_path={ckpt}", f"image={fake}", monkeypatch=monkeypatch, capsys=capsys
    )
    assert_one_line("predict", code, err, "cannot read image", str(fake))
    code, err = run_in_process(
        "predict",
        f"ckpt_path={ckpt}",
        f"image={tmp_path / 'nope.png'}",
        monkeypatch=monkeypatch,
        capsys=capsys,
    )
    assert_one_line("predict", code, err, "no such file", "nope.png")


def test_a_multimodal_checkpoint_points_to_chat_and_chat_points_back(
    quick_start, tmp_path, monkeypatch, capsys
):
    ckpt, data = quick_start
    llava = tmp_path / "llava.ckpt"
    run_config = {"task": {"kind": "multimodal", "name": "shapes_llava"}, "model": {"name": "piip_tiny"}}
    torch.save({"hyper_parameters": {"run_config": run_config}, "state_dict": {}}, llava)
    image = next((data / "val").rglob("*.JPEG"))
    code, err = run_in_process(
        "predict", f"ckpt_path={llava}", f"image={image}", monkeypatch=monkeypatch, capsys=capsys
    )
    assert_one_line("predict", code, err, "multimodal", f"python -m piip.tools.chat ckpt_path={llava}")
    code, err = run_in_process(
        "chat", f"ckpt_path={ckpt}", "question=hi", monkeypatch=monkeypatch, capsys=capsys
    )
    assert_one_line("chat", code, err, "classification", "python -m piip.tools.predict")


MISSING = "/no/such/dir/best.ckpt"


@pytest.mark.parametrize(
    ("tool", "args", "expected"),
    [
        ("predict", [f"ckpt_path={MISSING}", "image=x.png"], ["checkpoint not found", MISSING]),
        ("predict", ["ckpt_path=a.ckpt", "imag=x.png"], ["unknown argument 'imag=x.png'", "usage:"]),
        ("predict", ["ckpt_path=a.ckpt"], ["missing image="]),
        ("chat", [f"ckpt_path={MISSING}"], ["checkpoint not found", MISSING]),
        ("chat", [f"ckpt_path={MISSING}", "max_new_tokens=many"], ["max_new_tokens"]),
        ("consolidate", [MISSING], [MISSING]),
        ("consolidate", [MISSING, "--outt", "x"], ["unrecognized arguments: --outt"]),
        ("sweep_summary", ["--metrc", "val/top1", "/tmp"], ["unrecognized arguments: --metrc"]),
        ("sweep_summary", ["/no/such/sweep"], ["does not exist"]),
        ("paper_table", ["model=piip_sbl"], ["takes no arguments"]),
        ("flops", ["modle=piip_sbl"], ["Could not override 'modle'"]),
        ("flops", ["model=piip_nope"], ["Could not find 'model/piip_nope'", "piip_sbl"]),
        ("benchmark", ["batch_size=two"], ["batch_size: expected a whole number", "'two'"]),
        ("memory", ["dtype=fp16"], ["dtype: expected one of"]),
        ("memory", ["trainer.max_epochs=["], ["'['"]),
    ],
)
def test_every_tool_reports_a_user_error_in_one_line(tool, args, expected, monkeypatch, capsys):
    code, err = run_in_process(tool, *args, monkeypatch=monkeypatch, capsys=capsys)
    assert_one_line(tool, code, err, *expected)


def test_a_real_process_gets_one_line_from_a_hydra_tool():
    """Hydra reports errors itself unless HYDRA_FULL_ERROR is set; `run_tool` takes over in a real process."""
    flops = run_module("piip.tools.flops", "modle=piip_sbl")
    assert_one_line("flops", flops.returncode, flops.stderr, "Could not override 'modle'")
