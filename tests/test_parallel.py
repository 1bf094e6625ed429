"""trainer=ddp and trainer=fsdp on CPU (gloo): two processes follow the loss trajectory of one process on the
same global batch, and FSDP's sharded checkpoints resume, evaluate and consolidate.

Each run goes through `python train.py` in a subprocess, as a user launches it: Lightning starts the second
rank by re-running that command. The global batch is 8 (1 x 8 or 2 x 4): the resumable sampler deals
rank r every second sample of the same shuffled order, and augmentation is seeded per sample, so both
set-ups see the same images per step. Drop path is off, so nothing random depends on the rank.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from piip.run.checkpoints import read_checkpoint
from piip.tools.consolidate import consolidate
from tests.test_cli import run

STEPS_PER_EPOCH = 6  # 8 classes x 6 images, global batch 8
SAVED, CRASH = 8, 9  # last.ckpt every 4 steps; a crash before step 9 resumes from step 8
# fp32 sums in another order (all-reduce vs one batch) differ in the last bits; AdamW then amplifies the
# difference for weights whose gradients are near zero. Measured: losses agree to ~1e-7 relative and
# weights to 2e-5 after 6 steps.
LOSS_RTOL = 1e-4
WEIGHT_ATOL = 1e-4

COMMON = [
    "logger=none",
    "callbacks.progress_bar=null",
    "callbacks.model_summary=null",
    "callbacks.best_checkpoint=null",
    "+trainer.enable_progress_bar=false",
    "+trainer.enable_model_summary=false",
    "+callbacks.losses._target_=tests.lightning_helpers.RecordLosses",
    "trainer.accelerator=cpu",
    "trainer.precision=32-true",
    "trainer.num_sanity_val_steps=0",
    "trainer.limit_val_batches=0",
    "trainer.deterministic=true",
    "task.data.num_workers=0",
    "task.data.synthetic.train_per_class=6",
    "task.data.synthetic.val_per_class=2",
    "task.backbone.interaction.drop_path=0",
    "test_after_fit=false",
    "trainer.max_epochs=2",
    "callbacks.last_checkpoint.every_n_train_steps=4",
]
RUN = "piip_tiny_64_48_32"
ONE_PROCESS = ["trainer=cpu", "task.data.batch_size=8"]
DDP = ["trainer=ddp", "trainer.devices=2", "task.data.batch_size=4"]
FSDP = ["trainer=fsdp", "trainer.devices=2", "task.data.batch_size=4", "trainer.strategy.param_dtype=fp32"]


def train(root: Path, data: Path, *overrides: str, crashes: bool = False, common: list[str] = COMMON) -> Path:
    """Runs train.py (expecting it to fail when `crashes`); returns the output folder of its task."""
    args = [f"paths.root_dir={root}", f"paths.data_dir={data}", *common, *overrides]
    done = run("train.py", *args)
    assert (done.returncode != 0) == crashes, done.stderr[-4000:]
    if crashes:
        assert "simulated crash" in done.stderr, done.stderr[-4000:]
    return root / "outputs" / "shapes"


def mean_losses(run: Path, ranks: int, first_step: int = 0) -> list[float]:
    """The global batch's mean loss per step: the mean of the ranks' means (equal per-rank batches)."""
    per_rank = [
        json.loads((run / "losses" / f"rank{r}_from{first_step}.json").read_text()) for r in range(ranks)
    ]
    return [sum(values) / ranks for values in zip(*per_rank, strict=True)]


def assert_same_weights(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> None:
    assert expected.keys() == actual.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name].float(), tensor.float(), atol=WEIGHT_ATOL, rtol=0, msg=name)


def evaluate_on_cpu(run_dir: Path, ckpt: Path) -> dict[str, float]:
    import evaluate as evaluate_entry
    from tests.test_train import compose_config

    overrides = [f"ckpt_path={ckpt}", "trainer=cpu", "+trainer.enable_progress_bar=false"]
    return evaluate_entry.evaluate(compose_config("evaluate", run_dir, overrides))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One process, two epochs; also generates the shared data folder."""
    root = tmp_path_factory.mktemp("one_process")
    data = tmp_path_factory.mktemp("data")
    return data, train(root, data, *ONE_PROCESS) / RUN


def test_two_process_ddp_follows_the_one_process_loss_trajectory(tmp_path, reference):
    data, single = reference
    ddp = train(tmp_path, data, *DDP) / RUN
    expected = mean_losses(single, ranks=1)
    assert len(expected) == 2 * STEPS_PER_EPOCH
    assert mean_losses(ddp, ranks=2) == pytest.approx(expected, rel=LOSS_RTOL)
    assert expected[-1] < expected[0]  # it trained: a trajectory, not a constant
    one = read_checkpoint(single / "checkpoints" / "last.ckpt")
    two = read_checkpoint(ddp / "checkpoints" / "last.ckpt")
    assert two["global_step"] == one["global_step"] == 2 * STEPS_PER_EPOCH
    assert_same_weights(one["state_dict"], two["state_dict"])


@pytest.mark.slow  # 45 s; FSDP stays in the default suite with the DINO bf16 run
def test_two_process_fsdp_follows_it_through_a_sharded_checkpoint_resume(tmp_path, reference):
    data, single = reference
    crash = [
        "+callbacks.crash._target_=tests.lightning_helpers.CrashAtStep",
        f"+callbacks.crash.step={CRASH}",
    ]
    first = train(tmp_path, data, *FSDP, *crash, crashes=True) / RUN
    folder = first / "checkpoints" / "last.ckpt"
    assert folder.is_dir() and len(list(folder.glob("*.distcp"))) == 2  # one shard per rank
    assert read_checkpoint(folder, weights=False)["global_step"] == SAVED  # mid-way through epoch 2
    resumed = train(tmp_path, data, *FSDP, "ckpt_path=last") / RUN
    assert resumed == first

    # weights, AdamW moments, schedule and sampler position all came back, or the rest would drift
    trajectory = mean_losses(first, 2)[:SAVED] + mean_losses(resumed, 2, first_step=SAVED)
    assert trajectory == pytest.approx(mean_losses(single, ranks=1), rel=LOSS_RTOL)

    one = read_checkpoint(single / "checkpoints" / "last.ckpt")
    sharded = read_checkpoint(folder)  # read without a process group: full tensors
    assert sharded["global_step"] == 2 * STEPS_PER_EPOCH
    assert_same_weights(one["state_dict"], sharded["state_dict"])
    shapes_only = read_checkpoint(folder, weights=False)
    assert {k: v.shape for k, v in shapes_only["state_dict"].items()} == {
        k: v.shape for k, v in one["state_dict"].items()
    }

    single_file = consolidate(folder)
    on_folder, on_file = (
        evaluate_on_cpu(tmp_path / name, ckpt) for name, ckpt in [("a", folder), ("b", single_file)]
    )
    assert on_folder == on_file and on_folder["val/top1"] >= 0.0
    saved = torch.load(single_file, map_location="cpu", weights_only=True)
    assert saved["hyper_parameters"]["run_config"]["trainer"]["strategy"]["_target_"].endswith(
        "FSDP2Strategy"
    )
    assert "optimizer_states" not in saved and saved["global_step"] == 2 * STEPS_PER_EPOCH
    for name, tensor in sharded["state_dict"].items():
        assert torch.equal(saved["state_dict"][name], tensor), name


LLAVA_FSDP = [
    "task=shapes_llava",
    "trainer=fsdp",
    "trainer.devices=2",
    "trainer.precision=bf16-mixed",  # the GPU preset's numerics: bf16 gathered parameters under autocast
    "grad_checkpointing=true",
    "trainer.limit_train_batches=2",
    "trainer.max_epochs=1",
    "task.epochs=1",
    "task.stages.finetune.task.epochs=1",
    "task.data.batch_size=2",
    "task.data.eval_batch_size=4",
    "task.data.synthetic.train_images=8",
    "task.data.synthetic.val_images=3",
    "task.stages.pretrain.task.module.trainable=[projector]",
]


@pytest.mark.slow  # 27 s
def test_fsdp_trains_both_llava_stages_with_a_frozen_language_model_and_answers_every_question(tmp_path):
    from transformers import AutoModelForCausalLM

    # the held-out questions are answered after stage 2 (the stage config tests after fitting)
    common = [
        o for o in COMMON if not o.startswith(("task.data.synthetic", "trainer.limit_val", "trainer.prec"))
    ]
    run = train(tmp_path, tmp_path / "data", *LLAVA_FSDP, common=common).with_name("shapes_llava")
    run = run / "piip_tiny_64_32_32"

    # stage 1 under FSDP: the LLM was sharded, gathered in bf16 and never updated
    stage1 = read_checkpoint(run / "pretrain" / "checkpoints" / "last.ckpt")["state_dict"]
    folder = tmp_path / "data" / "shapes_llava" / "language_model"
    original = AutoModelForCausalLM.from_pretrained(folder).state_dict()
    for name, tensor in original.items():
        assert torch.equal(stage1[f"language_model.{name}"], tensor), name

    # stage 2 started from the sharded stage-1 folder; both ranks' answers were gathered and scored
    questions = json.loads((tmp_path / "data" / "shapes_llava" / "finetune_val.json").read_text())
    results = json.loads((run / "finetune" / "results.json").read_text())
    assert results["metrics"]["test/answer_count"] == len(questions)
    assert 0.0 <= results["metrics"]["test/answer_accuracy"] <= 1.0


def test_shard_units_are_every_branch_block_and_interaction_unit_once():
    from piip.models import PIIPBackbone, PIIPConfig
    from piip.run.config import backbone_dict, compose

    backbone = PIIPBackbone(PIIPConfig.from_dict(backbone_dict(compose("train", ["task=shapes"]))))
    units = backbone.shard_units()
    assert len({id(u) for u in units}) == len(units)
    pairs = (backbone.config.num_branches - 1) * backbone.num_interactions
    assert len(units) == sum(b.depth for b in backbone.branches) + pairs
    inside = {id(m) for u in units for m in u.modules() if m is not u}
    assert not any(id(u) in inside for u in units)  # no unit nested in another


def test_fsdp_strategy_names_a_bad_dtype():
    from piip.distributed.fsdp import FSDP2Strategy
    from piip.errors import ConfigError

    with pytest.raises(ConfigError, match="trainer.strategy.param_dtype='bf4'"):
        FSDP2Strategy(param_dtype="bf4")


@pytest.mark.parametrize(
    "task, metric",
    [
        pytest.param(  # UperNet's BatchNorm keeps fp32 parameters in a unit of its own
            "shapes_seg", "test/mIoU", marks=pytest.mark.slow
        ),
        pytest.param(
            "shapes_det", "test/bbox_mAP", marks=pytest.mark.slow
        ),  # Mask R-CNN on the sharded pyramid
        ("shapes_det_dino", "test/bbox_mAP"),  # DINO: encoder and decoder layers are shard units too
    ],
)
def test_fsdp_with_bf16_parameters_trains_and_tests_dense_tasks(tmp_path, task, metric):
    dropped = (
        "task.data.synthetic",
        "task.backbone",
        "trainer.limit_val",
        "trainer.prec",
        "test_after",
        "trainer.max_e",
    )
    common = [o for o in COMMON if not o.startswith(dropped)]
    dense = [
        f"task={task}",
        "trainer=fsdp",
        "trainer.devices=2",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "task.data.batch_size=2",
        "task.data.synthetic.train_images=4",
        "task.data.synthetic.val_images=3",
        "grad_checkpointing=true",
    ]
    run = train(tmp_path, tmp_path / "data", *dense, common=common).with_name(task) / "piip_tiny_128_96_64"
    results = json.loads((run / "results.json").read_text())
    assert 0.0 <= results["metrics"][metric] <= 1.0  # tested after fitting, on both ranks
    assert math.isfinite(results["metrics"]["train/loss"])
    assert (run / "checkpoints" / "last.ckpt" / "meta.pt").is_file()  # sharded
