"""`task=shapes_llava` through Hydra on a tiny run: stage 1 trains only the projector, stage 2 starts from
stage 1's weights and trains everything; then evaluate (held-out answers, TextVQA, MMBench) and chat."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import evaluate as evaluate_entry
import train as train_entry
from piip.errors import ConfigError
from piip.tools import chat
from tests.test_train import QUIET_CPU_RUN, compose_config, train_config

LLAVA_RUN = [
    "task=shapes_llava",
    *QUIET_CPU_RUN,
    "trainer.num_sanity_val_steps=0",
    "trainer.limit_train_batches=2",
    "task.epochs=1",
    "task.val_every_n_epochs=1",
    "task.stages.finetune.task.epochs=1",
    "task.stages.finetune.task.val_every_n_epochs=1",
    "task.data.num_workers=0",
    "task.data.batch_size=4",
    "task.data.eval_batch_size=8",
    "task.data.synthetic.train_images=8",
    "task.data.synthetic.val_images=3",
    "task.stages.pretrain.task.module.trainable=[projector]",  # the paper's stage 1 (shapes trains all)
]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], prefix: str) -> bool:
    return any(not torch.equal(v, after[k]) for k, v in before.items() if k.startswith(prefix))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("llava")
    cfg = train_config(root, root / "data", run=LLAVA_RUN)
    initial = _initial_weights(cfg)
    score = train_entry.train(cfg)
    results = json.loads((root / "run" / "results.json").read_text())
    assert results["score"] == score
    return root, {"results": results, "initial": initial}


def _initial_weights(cfg) -> dict[str, torch.Tensor]:
    """The stage-1 model as train.py builds it (same seed), before any step."""
    import lightning as L

    from piip.run import build, stages
    from piip.run.config import backbone_dict

    (_, stage), _ = stages.stage_configs(cfg)
    L.seed_everything(stage.seed, workers=True)
    backbone = backbone_dict(stage)
    build.build_datamodule(stage, backbone)  # writes the embedded data and its language model
    module = build.build_task(stage, backbone, load_pretrained=True)
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_stage_one_trains_only_the_projector_and_stage_two_everything(trained):
    root, found = trained
    initial = found["initial"]
    stage1 = weights(root / "run" / "pretrain" / "checkpoints" / "last.ckpt")
    stage2 = weights(root / "run" / "finetune" / "checkpoints" / "last.ckpt")
    assert changed(initial, stage1, "projector.")
    assert not changed(initial, stage1, "backbone.")
    assert not changed(initial, stage1, "language_model.")
    for part in ("projector.", "backbone.branches.", "language_model."):
        assert changed(stage1, stage2, part), part


def test_stage_two_reports_held_out_answer_accuracy(trained):
    root, found = trained
    results = found["results"]
    assert results["stage"] == "finetune" and results["monitor"] == "val/answer_accuracy"
    assert 0.0 <= results["metrics"]["test/answer_accuracy"] <= 1.0
    assert results["metrics"]["test/answer_count"] > 0
    assert (root / "run" / "pretrain" / "results.json").is_file()


def test_a_finished_staged_run_resumed_with_last_skips_its_stages(trained, tmp_path):
    root, found = trained
    cfg = train_config(root, root / "data", "ckpt_path=last", run=LLAVA_RUN)
    before = (root / "run" / "finetune" / "checkpoints" / "last.ckpt").stat().st_mtime
    assert train_entry.train(cfg) == found["results"]["score"]
    assert (root / "run" / "finetune" / "checkpoints" / "last.ckpt").stat().st_mtime == before


@pytest.mark.parametrize(
    ("benchmark", "metric", "answers_file"),
    [
        ("shapes_textvqa", "val/textvqa_accuracy", "textvqa"),
        ("shapes_mmbench", "val/mmbench_circular_accuracy", "mmbench"),
    ],
)
def test_evaluate_on_a_benchmark_writes_answers_and_scores(trained, benchmark, metric, answers_file):
    root, found = trained
    ckpt = root / "run" / "finetune" / "checkpoints" / "last.ckpt"
    cfg = compose_config(
        "evaluate",
        root / f"eval_{benchmark}",
        [f"ckpt_path={ckpt}", f"task={benchmark}", "trainer=cpu", f"paths.data_dir={root / 'data'}"],
    )
    metrics = evaluate_entry.evaluate(cfg)
    assert 0.0 <= metrics[metric] <= 1.0
    answers = json.loads((ckpt.parent / f"last_{answers_file}_answers.json").read_text())
    assert answers and all("prediction" in a for a in answers)
    results = json.loads((ckpt.parent / "results.json").read_text())
    assert results[f"last.ckpt:{benchmark}"]["monitor"] == metric


def test_chat_answers_like_the_evaluation_did(trained, capsys):
    root, _ = trained
    ckpt = root / "run" / "finetune" / "checkpoints" / "last.ckpt"
    cfg = compose_config("evaluate", root / "eval_answers", [f"ckpt_path={ckpt}", "trainer=cpu"])
    evaluate_entry.evaluate(cfg)
    record = json.loads((ckpt.parent / "last_answer_answers.json").read_text())[0]
    samples = json.loads((root / "data" / "shapes_llava" / "finetune_val.json").read_text())
    sample = next(s for s in samples if s["id"] == record["question_id"])
    question = sample["conversations"][0]["value"].replace("<image>", "").strip()
    image = root / "data" / "shapes_llava" / "images" / sample["image"]
    (reply,) = chat.chat(str(ckpt), image=str(image), question=question, device="cpu", max_new_tokens=4)
    assert reply == record["prediction"]
    assert reply in capsys.readouterr().out


def test_a_language_model_folder_that_does_not_exist_is_named(tmp_path):
    cfg = train_config(
        tmp_path, tmp_path / "data", "task.module.language_model.path=/nowhere/vicuna", run=LLAVA_RUN
    )
    # the tokenizer comes from the same folder by default, and is loaded first
    with pytest.raises(
        ConfigError, match="task.data.tokenizer: tokenizer folder /nowhere/vicuna does not exist"
    ):
        train_entry.train(cfg)


def test_max_length_beyond_the_language_models_positions_is_refused(tmp_path):
    cfg = train_config(tmp_path, tmp_path / "data", "task.data.max_length=100000", run=LLAVA_RUN)
    with pytest.raises(
        ConfigError, match="task.data.max_length=100000 exceeds .*max_position_embeddings=512"
    ):
        train_entry.train(cfg)


def test_ckpt_path_last_with_nothing_to_resume_starts_from_the_pretrained_weights(tmp_path):
    """A requeued job passes ckpt_path=last from its first start: with no checkpoint yet, the language model
    must still come from its folder, not from a random init."""
    cfg = train_config(tmp_path, tmp_path / "data", "ckpt_path=last", run=LLAVA_RUN)
    initial = _initial_weights(cfg)
    train_entry.train(cfg)
    stage1 = weights(tmp_path / "run" / "pretrain" / "checkpoints" / "last.ckpt")
    assert not changed(initial, stage1, "language_model.")
