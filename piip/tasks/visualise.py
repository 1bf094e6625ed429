"""Send a few annotated validation images to wherever the run logs: W&B, TensorBoard, or PNG files.

Dense tasks call `log_images` once per validation epoch with RGB arrays they drew themselves
(`DetectionTask.annotate`, `SegmentationTask.annotate`); CSV runs and runs without a logger get PNGs under
`<log dir>/images/`, so every run keeps something to look at.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from PIL import Image

from piip.data.files import atomic_file

IMAGE_DIR = "images"


def log_images(module: L.LightningModule, key: str, images: list[np.ndarray]) -> list[Path]:
    """Log H×W×3 uint8 images under `key` at the current step (rank 0 only); returns PNGs written."""
    trainer = module.trainer
    if not images or trainer is None or not trainer.is_global_zero:
        return []
    if trainer.sanity_checking or trainer.fast_dev_run:  # runs that log nothing else draw nothing either
        return []
    step = trainer.global_step
    sent = False
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=list(images), step=step)
            sent = True
        elif isinstance(logger, TensorBoardLogger):
            for i, image in enumerate(images):
                logger.experiment.add_image(f"{key}/{i}", image, step, dataformats="HWC")
            sent = True
    if sent:
        return []
    log_dir = getattr(trainer.loggers[0], "log_dir", None) if trainer.loggers else None
    root = Path(log_dir or trainer.default_root_dir)
    folder = root / IMAGE_DIR / key.replace("/", "_")
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        path = folder / f"step{step:07d}_{i}.png"
        with atomic_file(path) as stream:
            Image.fromarray(image).save(stream, format="PNG")
        paths.append(path)
    return paths
