"""Evaluate a checkpoint: `python evaluate.py ckpt_path=PATH [task=BENCHMARK] [data.root=…] [trainer.…]`.

Rebuilds model and data from the config saved in the checkpoint, runs the task's evaluation (the
validation split), prints a metrics table and writes them to `results.json` beside the checkpoint, keyed by
checkpoint file name so evaluating several checkpoints of one run keeps every result. Detection also writes
the COCO results JSON files (`<checkpoint>_bbox.json`, `<checkpoint>_segm.json`) the COCO server accepts.
`task=textvqa` / `task=mmbench` evaluate a multimodal checkpoint on that benchmark instead of its own
validation questions, and write the generated answers to `<checkpoint>_<benchmark>_answers.json`.
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from piip.data.files import write_json
from piip.run import build, checkpoints, results
from piip.run.config import CONF_DIR, plain


def evaluate(cfg: DictConfig) -> dict[str, float]:
    build.configure_cpu_math()
    ckpt_path = Path(cfg.ckpt_path).expanduser().resolve()
    benchmark = cfg.get("task")  # e.g. task=textvqa: its data replaces the training data's question set
    data_overrides = plain(benchmark.data) if benchmark else {}
    data_overrides.update({k: v for k, v in cfg.data.items() if v is not None})
    saved, backbone, module = checkpoints.load_task_from_checkpoint(ckpt_path, data_overrides)
    if benchmark:
        saved.task.monitor = benchmark.monitor
    if cfg.use_ema is False:
        module.ema = None
    module.predictions_prefix = ckpt_path.with_suffix("")  # e.g. best_bbox.json for COCO
    datamodule = build.build_datamodule(saved, backbone)
    build.connect(module, datamodule)
    trainer = build.build_trainer(cfg, build.build_all(cfg, "callbacks"), build.build_all(cfg, "logger"))
    metrics = results.scalars(trainer.validate(module, datamodule=datamodule)[0])

    table = Table(title=f"{saved.model.name} · {saved.task.name} · {ckpt_path.name}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in sorted(metrics.items()):
        table.add_row(name, f"{value:.4f}")
    Console().print(table)
    if trainer.is_global_zero:
        results_path = ckpt_path.parent / "results.json"
        recorded = json.loads(results_path.read_text()) if results_path.is_file() else {}
        key = f"{ckpt_path.name}:{benchmark.name}" if benchmark else ckpt_path.name
        recorded[key] = results.results_record(
            saved, backbone, metrics, metrics.get(saved.task.monitor.metric), ckpt_path=str(ckpt_path)
        )
        print(f"results: {write_json(results_path, recorded)}")
    return metrics


@hydra.main(config_path=str(CONF_DIR), config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
