"""Train a PIIP model: `python train.py [model=…] [task=…] [resolution=…] [trainer.devices=8] [-m …]`.

seed → data → task module → callbacks → loggers → trainer → fit → test → results.json. Returns the monitored
metric, so Hydra sweepers can optimise it. With no argument it runs the quick start on embedded data.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import lightning as L
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from piip.data.files import write_json
from piip.run import build, checkpoints, results, stages
from piip.run.cli import one_job_of_a_multirun, quote_resolution_overrides
from piip.run.config import CONF_DIR, backbone_dict


def train(cfg: DictConfig) -> float | None:
    """Every stage of the task in order (most tasks have one); returns the last stage's score."""
    build.configure_cpu_math()
    record, previous = None, cfg.get("init_from")
    for stage, stage_cfg in stages.stage_configs(cfg):
        done = stages.finished_stage(stage_cfg) if stage else None  # a one-stage run resumes as it always did
        record = done or fit_and_test(stage_cfg, init_from=previous)
        previous = checkpoints.find_last_checkpoint(stage_cfg.trainer.default_root_dir) if stage else None
        if stage and record is not None and rank_zero_only.rank == 0:
            write_json(Path(cfg.trainer.default_root_dir, "results.json"), {**record, "stage": stage})
    return record["score"] if record else None


def fit_and_test(cfg: DictConfig, init_from: Path | None = None) -> dict | None:
    L.seed_everything(cfg.seed, workers=True)
    run_dir = Path(cfg.trainer.default_root_dir)
    backbone = backbone_dict(cfg)
    datamodule = build.build_datamodule(cfg, backbone)
    build.clean_output_folders(cfg, callbacks := build.build_all(cfg, "callbacks"))  # before `last` is sought
    ckpt_path = checkpoints.resume_path(cfg, run_dir)
    fresh = ckpt_path is None and init_from is None
    module = build.build_task(cfg, backbone, load_pretrained=cfg.load_pretrained and fresh)
    build.connect(module, datamodule)
    if ckpt_path is not None:
        checkpoints.check_resume(ckpt_path, module)
    elif init_from is not None:
        checkpoints.load_weights(module, init_from)
    loggers = build.build_loggers(cfg, resuming=ckpt_path is not None)
    trainer = build.build_trainer(cfg, callbacks, loggers)
    counts = results.complexity(cfg, backbone) if trainer.is_global_zero else {}
    for logger in trainer.loggers:
        logger.log_hyperparams({f"model/{k}": v for k, v in counts.items()})
    if counts.get("gflops"):  # ThroughputMonitor's FLOPs/s: multiply-adds x 2, forward + backward x 3
        module.flops_per_batch = counts["gflops"] * 1e9 * 2 * 3 * cfg.task.data.batch_size

    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    best = getattr(trainer.checkpoint_callback, "best_model_score", None)
    best_path = getattr(trainer.checkpoint_callback, "best_model_path", "") or None
    metrics = results.scalars(trainer.callback_metrics)
    if cfg.test_after_fit and not trainer.fast_dev_run:
        for result in trainer.test(module, datamodule=datamodule, ckpt_path=best_path, weights_only=True):
            metrics.update(results.scalars(result))
    score = float(best) if best is not None else metrics.get(cfg.task.monitor.metric)
    record = results.results_record(cfg, backbone, metrics, score, **counts, ckpt_path=best_path)
    if trainer.is_global_zero:
        write_json(run_dir / "results.json", record)
    build.close_loggers(trainer)
    return record


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    with one_job_of_a_multirun():
        return train(cfg)


if __name__ == "__main__":
    quote_resolution_overrides()
    main()
