"""train.py / evaluate.py end to end on the embedded shapes data, composed through Hydra's compose API.

Each run is tiny (8 classes x 6 training images, batch 8, piip_tiny at 64/48/32) so the whole file stays
within about a minute on a 2-core CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, open_dict

import evaluate as evaluate_entry
import train as train_entry
from piip.errors import CheckpointError, ConfigError
from piip.run.config import CONF_DIR
from piip.tasks import NonFiniteLossError

# A CPU run that logs to CSV and prints no progress bar or model summary (shared by the task test files).
QUIET_CPU_RUN = [
    "trainer=cpu",
    "logger=csv",
    "callbacks.progress_bar=null",
    "callbacks.model_summary=null",
    "+trainer.enable_progress_bar=false",
    "+trainer.enable_model_summary=false",
]
TINY_RUN = [
    *QUIET_CPU_RUN,
    "trainer.max_epochs=1",
    "task.val_every_n_epochs=1",
    "trainer.num_sanity_val_steps=0",
    "task.data.num_workers=0",
    "task.data.batch_size=8",
    "task.data.synthetic.train_per_class=6",
    "task.data.synthetic.val_per_class=2",
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One generated shapes dataset shared by every run of this file (generated on first use)."""
    return tmp_path_factory.mktemp("data")


def compose_config(name: str, run_dir: Path, overrides: list[str]) -> DictConfig:
    """What `hydra.main` would hand to the entry point, with the run folder set."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(name, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    return cfg


def train_config(tmp_path: Path, data_dir: Path, *overrides: str, run: list[str] = TINY_RUN) -> DictConfig:
    """The train config of a `run` (default: the tiny classification run) in tmp_path/run."""
    base = [f"paths.root_dir={tmp_path}", f"paths.data_dir={data_dir}", *run]
    return compose_config("train", tmp_path / "run", base + list(overrides))


def checkpoint_dir(tmp_path: Path) -> Path:
    return tmp_path / "run" / "checkpoints"


def test_train_writes_checkpoints_and_results_then_evaluate_reproduces_them(tmp_path, data_dir):
    score = train_entry.train(train_config(tmp_path, data_dir, "trainer.limit_train_batches=3"))
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["model"] == "piip_tiny" and results["resolution"] == [64, 48, 32]
    assert results["monitor"] == "val/top1" and results["score"] == pytest.approx(score)
    assert 0.0 <= results["metrics"]["test/top1"] <= 1.0
    assert results["params_m"] > 0 and results["gflops"] > 0 and results["paper_gflops"] > 0
    best, last = checkpoint_dir(tmp_path) / "best.ckpt", checkpoint_dir(tmp_path) / "last.ckpt"
    assert Path(results["ckpt_path"]) == best and last.is_file()
    saved = torch.load(best, map_location="cpu", weights_only=True)  # plain data only
    assert saved["hyper_parameters"]["run_config"]["model"]["name"] == "piip_tiny"

    cfg = compose_config(
        "evaluate",
        tmp_path / "eval",
        [f"ckpt_path={best}", "trainer=cpu", "+trainer.enable_progress_bar=false"],
    )
    metrics = evaluate_entry.evaluate(cfg)
    # the test stage after training evaluated the same checkpoint on the same split
    assert metrics["val/top1"] == pytest.approx(results["metrics"]["test/top1"])
    assert metrics["val/loss"] == pytest.approx(results["metrics"]["test/loss"], rel=1e-5)
    written = json.loads((checkpoint_dir(tmp_path) / "results.json").read_text())
    assert written["best.ckpt"]["metrics"]["val/top1"] == metrics["val/top1"]


@pytest.mark.slow  # 19 s; tests/test_resume_grid.py's mid_epoch kill checks the same in the default suite
def test_resume_mid_epoch_ends_exactly_like_an_uninterrupted_run(tmp_path, data_dir):
    common = [
        "trainer.max_epochs=2",
        "trainer.deterministic=true",
        "callbacks.last_checkpoint.every_n_train_steps=4",
        "test_after_fit=false",
    ]
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    train_entry.train(train_config(straight, data_dir, *common))

    crash = ["+callbacks.crash._target_=tests.lightning_helpers.CrashAtStep", "+callbacks.crash.step=9"]
    with pytest.raises(RuntimeError, match="simulated crash at step 9"):
        train_entry.train(train_config(interrupted, data_dir, *common, *crash))
    stopped = torch.load(checkpoint_dir(interrupted) / "last.ckpt", weights_only=True)
    assert stopped["global_step"] == 8 and stopped["epoch"] == 1  # saved mid-way through the second epoch
    train_entry.train(train_config(interrupted, data_dir, *common, "ckpt_path=last"))

    a = json.loads((straight / "run" / "results.json").read_text())
    b = json.loads((interrupted / "run" / "results.json").read_text())
    # every validation metric and every weight is identical; only Lightning's running mean of the train loss
    # over the interrupted epoch restarts at the resume (it is not checkpointed)
    evaluation = {k: v for k, v in a["metrics"].items() if k.startswith("val")}
    assert len(evaluation) >= 3
    assert {k: b["metrics"][k] for k in evaluation} == evaluation
    last_a = torch.load(checkpoint_dir(straight) / "last.ckpt", weights_only=True)
    last_b = torch.load(sorted(checkpoint_dir(interrupted).glob("last*.ckpt"))[-1], weights_only=True)
    assert last_b["global_step"] == last_a["global_step"] == 12
    for name, tensor in last_a["state_dict"].items():
        assert torch.equal(tensor, last_b["state_dict"][name]), name


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path, data_dir):
    overrides = [
        "callbacks.last_checkpoint.every_n_train_steps=2",
        "+callbacks.poison._target_=tests.lightning_helpers.PoisonWeightsAtStep",
        "+callbacks.poison.step=3",
    ]
    with pytest.raises(NonFiniteLossError, match=r"global step 3, epoch 0, batch 3.*last\.ckpt"):
        train_entry.train(train_config(tmp_path, data_dir, *overrides))
    last = torch.load(checkpoint_dir(tmp_path) / "last.ckpt", weights_only=True)
    assert last["global_step"] == 2
    assert all(torch.isfinite(t).all() for t in last["state_dict"].values() if t.is_floating_point())


def test_checkpoint_of_another_model_is_refused_by_name(tmp_path, data_dir):
    train_entry.train(
        train_config(tmp_path, data_dir, "trainer.limit_train_batches=1", "test_after_fit=false")
    )
    other = train_config(tmp_path, data_dir, "model.branch0.timm_kwargs.embed_dim=64", "ckpt_path=last")
    with pytest.raises(CheckpointError, match=r"last\.ckpt holds model 'piip_tiny'.*branches\.0"):
        train_entry.train(other)


def test_a_model_built_for_another_class_count_is_refused(tmp_path, data_dir):
    cfg = train_config(tmp_path, data_dir, "task.backbone.num_classes=5")
    with pytest.raises(ConfigError, match="has 8 classes but the model is built for 5.*num_classes=8"):
        train_entry.train(cfg)


def test_evaluate_refuses_a_file_that_is_not_a_piip_checkpoint(tmp_path):
    foreign = tmp_path / "weights.pth"
    torch.save({"state_dict": {}}, foreign)
    cfg = compose_config("evaluate", tmp_path / "eval", [f"ckpt_path={foreign}"])
    with pytest.raises(CheckpointError, match=f"{foreign} is not a piip training checkpoint"):
        evaluate_entry.evaluate(cfg)
    with pytest.raises(CheckpointError, match="checkpoint not found: .*missing.ckpt"):
        evaluate_entry.evaluate(compose_config("evaluate", tmp_path, [f"ckpt_path={tmp_path}/missing.ckpt"]))


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("trainer.not_a_trainer_field=1", "not_a_trainer_field"),
        ("model=piip_nonexistent", "piip_nonexistent"),
    ],
)
def test_unknown_config_options_are_named(tmp_path, override, named):
    with pytest.raises(ConfigCompositionException, match=named):
        compose_config("train", tmp_path, [override])


@pytest.mark.slow  # 19 s; DDP stays with test_parallel's loss trajectory
def test_two_process_ddp_spawn_on_cpu(tmp_path, data_dir):
    cfg = train_config(
        tmp_path,
        data_dir,
        "trainer=ddp",
        "trainer.strategy=ddp_spawn",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.precision=32-true",
        "trainer.limit_train_batches=2",
        "logger=none",  # Lightning's CSVLogger cannot append to its file from a second spawn (fit, then test)
        # ImageNet's per-branch cls-token heads: DDP must not meet the unread last interaction stage
        "task.backbone.merge=none",
        "task.backbone.classifier=per_branch",
        "task.backbone.use_cls_token=true",
    )
    train_entry.train(cfg)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["metrics"]["test/top1"] >= 0.0
    saved = torch.load(checkpoint_dir(tmp_path) / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 2  # each of the 2 ranks took 2 steps on its own half of the data


def test_every_experiment_config_composes(tmp_path):
    from piip.run.config import backbone_dict

    experiments = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
    tasks = [p.stem for p in (CONF_DIR / "task").glob("*.yaml")]
    assert len(experiments) >= 3
    for name in experiments:
        cfg = compose_config("train", tmp_path, [f"experiment={name}"])
        backbone = backbone_dict(cfg)
        assert backbone["resolutions"] == sorted(backbone["resolutions"], reverse=True), name
        # the longest task name the experiment starts with: imagenet_*, coco_*, coco_dino_*, ade20k_*; dense
        # ones: tests/test_experiments_dense.py, tests/test_dino_configs.py
        task = max((t for t in tasks if name.startswith(f"{t}_")), key=len)
        assert cfg.task.name == task and cfg.trainer.max_epochs == cfg.task.epochs, name


def test_wandb_is_the_default_logger_and_stays_offline_without_configuration(tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    for name in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(name, raising=False)
    one_batch = ["trainer.limit_train_batches=1", "test_after_fit=false"]
    cfg = train_config(tmp_path, data_dir, "logger=wandb", *one_batch)
    assert cfg.logger.wandb.offline is True
    assert list(cfg.logger.wandb.tags) == ["piip_tiny", "shapes", "res_64_48_32"]
    train_entry.train(cfg)
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, "expected one offline W&B run folder"
    records = next(runs[0].glob("run-*.wandb")).read_bytes()  # offline runs keep everything in this file
    assert b"model/gflops" in records and b"run_config" in records  # model size and the resolved config
    assert b"train/loss" in records
