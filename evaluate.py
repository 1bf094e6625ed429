"""Evaluate a checkpoint: `python evaluate.py ckpt_path=PATH [data.root=…] [trainer.devices=…]`.

Rebuilds model and data from the config saved in the checkpoint, runs the task's evaluation (the
validation split), prints a metrics table and writes them to `results.json` beside the checkpoint, keyed by
checkpoint file name so evaluating several checkpoints of one run keeps every result.
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from piip import app
from piip.config import CONF_DIR


def evaluate(cfg: DictConfig) -> dict[str, float]:
    app.configure_cpu_math()
    ckpt_path = Path(cfg.ckpt_path).expanduser().resolve()
    checkpoint = app.read_checkpoint(ckpt_path)
    hparams = checkpoint["hyper_parameters"]
    saved = OmegaConf.create(hparams["run_config"])
    data_overrides = {k: v for k, v in cfg.data.items() if v is not None}
    saved.task.data = OmegaConf.merge(saved.task.data, data_overrides)
    backbone = hparams["backbone"]
    module = app.build_task(saved, backbone, load_pretrained=False)
    app.check_weights_fit(ckpt_path, checkpoint, module)
    module.load_state_dict(checkpoint["state_dict"])
    if cfg.use_ema is False:
        module.ema = None
    datamodule = app.build_datamodule(saved, backbone)
    trainer = app.build_trainer(cfg, app.build_all(cfg, "callbacks"), app.build_all(cfg, "logger"))
    metrics = app.scalars(trainer.validate(module, datamodule=datamodule)[0])

    table = Table(title=f"{saved.model.name} · {saved.task.name} · {ckpt_path.name}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in sorted(metrics.items()):
        table.add_row(name, f"{value:.4f}")
    Console().print(table)
    if trainer.is_global_zero:
        results_path = ckpt_path.parent / "results.json"
        results = json.loads(results_path.read_text()) if results_path.is_file() else {}
        results[ckpt_path.name] = app.results_record(
            saved, backbone, metrics, metrics.get(saved.task.monitor.metric), ckpt_path=str(ckpt_path)
        )
        print(f"results: {app.write_json(results_path, results)}")
    return metrics


@hydra.main(config_path=str(CONF_DIR), config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
