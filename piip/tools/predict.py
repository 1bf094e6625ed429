"""Draw a trained model's predictions on your own images.

    python -m piip.tools.predict ckpt_path=outputs/shapes_det/…/checkpoints/best.ckpt image=photo.jpg
    python -m piip.tools.predict ckpt_path=… image=folder/ output=preds/ device=cuda score=0.3

Rebuilds the task from the checkpoint alone (its saved run config), resizes each image as validation
does, and writes `<output>/<image stem>_<task>.png` with boxes and masks (detection) or a class overlay
(segmentation), at the image's own size. The data folder of the training run need not exist here.
`score` overrides the detection score a box needs to be drawn (`task.module.score_to_draw`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf
from PIL import Image

from piip.errors import DataError
from piip.run import build, checkpoints

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
USAGE = (
    "usage: python -m piip.tools.predict ckpt_path=PATH image=FILE_OR_FOLDER [output=DIR] [device=cpu|cuda] "
    "[score=MIN_SCORE]"
)


def image_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"image={path}: no {'/'.join(sorted(IMAGE_SUFFIXES))} files in this folder")
        return files
    if not path.is_file():
        raise DataError(f"image={path}: no such file or folder")
    return [path]


def predict(
    ckpt_path: str, image: str, output: str = ".", device: str | None = None, score: float | None = None
) -> list[Path]:
    """Annotated PNGs for one image or every image of a folder; returns the files written."""
    build.configure_cpu_math()
    saved, backbone, module = checkpoints.load_task_from_checkpoint(Path(ckpt_path).expanduser().resolve())
    if score is not None:
        module.score_to_draw = float(score)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    module.to(device).eval()
    datamodule = build.build_datamodule(saved, backbone)
    out_dir = Path(output)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path in image_files(Path(image).expanduser()):
        picture, target = datamodule.prediction_input(path)
        (drawn,) = module.annotate([picture], [target])
        destination = out_dir / f"{path.stem}_{saved.task.name}.png"
        Image.fromarray(drawn).save(destination)
        written.append(destination)
        print(destination)
    return written


def main(argv: list[str]) -> None:
    args = OmegaConf.to_container(OmegaConf.from_cli(argv))
    missing = [key for key in ("ckpt_path", "image") if key not in args]
    unknown = sorted(set(args) - {"ckpt_path", "image", "output", "device", "score"})
    if missing or unknown:
        raise SystemExit(f"{USAGE}\nmissing: {missing}, unknown: {unknown}")
    predict(**{k: v if k == "score" else str(v) for k, v in args.items()})


if __name__ == "__main__":
    main(sys.argv[1:])
