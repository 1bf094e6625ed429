"""Draw a trained model's predictions on your own images.

    python -m piip.tools.predict ckpt_path=outputs/shapes/piip_tiny_64_48_32/checkpoints/best.ckpt image=a.png
    python -m piip.tools.predict ckpt_path=… image=folder/ output=preds/ device=cuda score=0.3

Rebuilds the task from the checkpoint alone (its saved run config), prepares each image as validation
does, and writes `<output>/<image stem>_<task>.png` at the image's own size: its top class in a caption
(classification, which also prints the top-5 classes with their probabilities), boxes and masks
(detection) or a class overlay (segmentation). The data folder of the training run need not exist here.
`score` overrides the detection score a box needs to be drawn (`task.module.score_to_draw`). A multimodal
checkpoint answers questions instead: `python -m piip.tools.chat`. Errors are one line (`run_tool`).
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch
from PIL import Image

from piip.data.files import atomic_file
from piip.errors import CheckpointError, DataError
from piip.models.checks import number_in
from piip.run import build, checkpoints
from piip.run.cli import key_value_args, run_tool

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
TOP_K = 5
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


def check_not_multimodal(ckpt_path: Path, image: str) -> None:
    """A multimodal checkpoint answers questions: point to the chat tool before building a language model."""
    run_config = checkpoints.read_checkpoint(ckpt_path, weights=False)["hyper_parameters"]["run_config"]
    task = run_config.get("task", {})
    if task.get("kind") == "multimodal":
        raise CheckpointError(
            f"{ckpt_path} holds a multimodal model ({task.get('name')}), which answers questions about an "
            f'image: python -m piip.tools.chat ckpt_path={ckpt_path} image={image} question="…"'
        )


def print_ranking(path: Path, ranking: list[tuple[str, float]]) -> None:
    print(f"{path}:")
    for rank, (name, probability) in enumerate(ranking, 1):
        print(f"  {rank}. {name:<12} {probability:>7.2%}")


def predict(
    ckpt_path: str, image: str, output: str = ".", device: str | None = None, score: float | None = None
) -> list[Path]:
    """Annotated PNGs for one image or every image of a folder; returns the files written."""
    build.configure_cpu_math()
    checkpoint = Path(ckpt_path).expanduser().resolve()
    check_not_multimodal(checkpoint, image)
    files = image_files(Path(image).expanduser())
    saved, backbone, module = checkpoints.load_task_from_checkpoint(checkpoint)
    if score is not None:
        module.score_to_draw = float(score)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    module.to(device).eval()
    datamodule = build.build_datamodule(saved, backbone)
    if not module.class_names:  # a checkpoint from before it kept them: the training data may still be here
        with contextlib.suppress(DataError, OSError):
            module.class_names = datamodule.class_names
    classifies = hasattr(module, "top_classes")
    out_dir = Path(output)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path in files:
        picture, target = datamodule.prediction_input(path)
        if classifies:
            (ranking,) = module.top_classes(picture[None], TOP_K)
            print_ranking(path, ranking)
            (drawn,) = module.draw_predictions([target], [ranking])
        else:
            (drawn,) = module.annotate([picture], [target])
        destination = out_dir / f"{path.stem}_{saved.task.name}.png"
        with atomic_file(destination) as stream:  # a kill leaves the previous picture, never half of one
            Image.fromarray(drawn).save(stream, format="PNG")
        written.append(destination)
        print(destination)
    return written


def main(argv: list[str]) -> int:
    args = key_value_args(argv, ("ckpt_path", "image"), ("output", "device", "score"), USAGE)
    if "score" in args:  # the task's own check (`number_in`), as `task.module.score_to_draw` gets
        with contextlib.suppress(ValueError):
            args["score"] = float(args["score"])
        args["score"] = number_in(args["score"], "score", 0, 1)
    predict(**args)
    return 0


if __name__ == "__main__":
    run_tool("predict", main, sys.argv[1:])
