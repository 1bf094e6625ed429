"""`task=shapes_det` through Hydra: train → test → evaluate (COCO results JSON) → predict, on a tiny run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate as evaluate_entry
import train as train_entry
from piip.tools import predict
from tests.test_train import QUIET_CPU_RUN, compose_config, train_config

DET_RUN = [
    "task=shapes_det",
    *QUIET_CPU_RUN,
    "trainer.max_epochs=1",
    "task.val_every_n_epochs=1",
    "trainer.num_sanity_val_steps=0",
    "trainer.limit_train_batches=2",
    "task.data.num_workers=0",
    "task.data.batch_size=2",
    "task.module.num_visualised=2",
    "task.data.synthetic.train_images=4",
    "task.data.synthetic.val_images=3",
    "task.data.synthetic.image_size=96",
    "task.data.scale=[128,96]",  # resized up: predictions must come back at the stored 96 x 96
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("det")
    train_entry.train(train_config(root, root / "data", run=DET_RUN))
    return root, json.loads((root / "run" / "results.json").read_text())


def test_training_logs_coco_metrics_and_pictures(trained):
    root, results = trained
    assert results["monitor"] == "val/bbox_mAP"
    for kind in ("bbox", "segm"):
        for name in ("mAP", "mAP_50", "mAP_75"):
            assert 0.0 <= results["metrics"][f"test/{kind}_{name}"] <= 1.0
    pictures = sorted((root / "run").rglob("images/val_examples/*.png"))
    assert len(pictures) == 2
    assert np.asarray(Image.open(pictures[0])).shape == (96, 96, 3)


def test_evaluate_writes_the_coco_results_json_and_reproduces_the_test_numbers(trained):
    root, results = trained
    best = Path(results["ckpt_path"])
    cfg = compose_config("evaluate", root / "eval", [f"ckpt_path={best}", "trainer=cpu"])
    metrics = evaluate_entry.evaluate(cfg)
    assert metrics["val/bbox_mAP"] == pytest.approx(results["metrics"]["test/bbox_mAP"])
    entries = json.loads((best.parent / f"{best.stem}_bbox.json").read_text())
    segm = json.loads((best.parent / f"{best.stem}_segm.json").read_text())
    assert len(entries) == len(segm)
    if entries:  # an untrained detector may find nothing above the score threshold
        assert set(entries[0]) == {"image_id", "category_id", "bbox", "score"}
        assert max(e["bbox"][0] + e["bbox"][2] for e in entries) <= 96.01
    saved = torch.load(best, map_location="cpu", weights_only=True)
    assert saved["class_names"][0] == "circle"


def test_predict_draws_on_a_users_image(trained, tmp_path):
    _, results = trained
    photo = tmp_path / "photo.png"
    Image.fromarray(np.full((70, 110, 3), 200, dtype=np.uint8)).save(photo)
    (written,) = predict.predict(
        results["ckpt_path"], str(photo), output=str(tmp_path / "out"), device="cpu", score=0.0
    )
    assert written.name == "photo_shapes_det.png"
    assert np.asarray(Image.open(written)).shape == (70, 110, 3)
    with pytest.raises(predict.DataError, match="no such file"):
        predict.predict(results["ckpt_path"], str(tmp_path / "nope.png"))


def test_debug_fast_runs_one_batch_end_to_end_without_drawing(tmp_path):
    cfg = train_config(tmp_path, tmp_path / "data", "debug=fast", run=DET_RUN)
    assert cfg.trainer.fast_dev_run is True
    train_entry.train(cfg)
    assert (tmp_path / "run" / "checkpoints").is_dir()  # it ran to the end
    assert not list((tmp_path / "run").rglob("*.png"))  # fast_dev_run logs nothing, pictures included


def test_a_class_count_that_differs_from_the_annotations_is_refused(tmp_path):
    from piip.errors import ConfigError

    cfg = train_config(tmp_path, tmp_path / "data", "task.module.num_classes=5", run=DET_RUN)
    with pytest.raises(
        ConfigError, match=r"has 8 classes but the model is built for 5; set task.module.num_classes=8"
    ):
        train_entry.train(cfg)
