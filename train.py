"""Train a PIIP model: `python train.py [model=…] [task=…] [resolution=…] [trainer.devices=8] [-m …]`.

seed → data → task module → callbacks → loggers → trainer → fit → test → results.json. Returns the monitored
metric, so Hydra sweepers can optimise it. With no argument it runs the quick start on embedded data.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig

from piip import app
from piip.cli import one_job_of_a_multirun, quote_resolution_overrides
from piip.config import CONF_DIR, backbone_dict
from piip.files import write_json


def train(cfg: DictConfig) -> float | None:
    app.configure_cpu_math()
    L.seed_everything(cfg.seed, workers=True)
    run_dir = Path(cfg.trainer.default_root_dir)
    backbone = backbone_dict(cfg)
    datamodule = app.build_datamodule(cfg, backbone)
    module = app.build_task(cfg, backbone, load_pretrained=cfg.load_pretrained and cfg.ckpt_path is None)
    ckpt_path = app.resolve_resume(cfg, module, run_dir)
    trainer = app.build_trainer(cfg, app.build_all(cfg, "callbacks"), app.build_all(cfg, "logger"))
    counts = app.complexity(cfg) if trainer.is_global_zero else {}
    for logger in trainer.loggers:
        logger.log_hyperparams({f"model/{k}": v for k, v in counts.items()})
    if counts.get("gflops"):  # ThroughputMonitor's FLOPs/s: multiply-adds x 2, forward + backward x 3
        module.flops_per_batch = counts["gflops"] * 1e9 * 2 * 3 * cfg.task.data.batch_size

    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    best = getattr(trainer.checkpoint_callback, "best_model_score", None)
    best_path = getattr(trainer.checkpoint_callback, "best_model_path", "") or None
    metrics = app.scalars(trainer.callback_metrics)
    if cfg.test_after_fit and not trainer.fast_dev_run:
        for result in trainer.test(module, datamodule=datamodule, ckpt_path=best_path, weights_only=True):
            metrics.update(app.scalars(result))
    score = float(best) if best is not None else metrics.get(cfg.task.monitor.metric)
    if trainer.is_global_zero:
        record = app.results_record(cfg, backbone, metrics, score, **counts, ckpt_path=best_path)
        write_json(run_dir / "results.json", record)
    app.close_loggers(trainer)
    return score


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    with one_job_of_a_multirun():
        return train(cfg)


if __name__ == "__main__":
    quote_resolution_overrides()
    main()
