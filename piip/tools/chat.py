"""Ask a trained PIIP-LLaVA checkpoint about an image.

    python -m piip.tools.chat ckpt_path=…/finetune/checkpoints/best.ckpt image=scene.png \
        question="how many shapes are there ?"
    python -m piip.tools.chat ckpt_path=… image=photo.jpg          # interactive: one question per line

Rebuilds the model from the checkpoint alone, preprocesses the image as its training did (pad to square,
resize to the highest branch resolution), and answers greedily with the checkpoint's conversation template.
Interactive mode keeps the conversation: each answer becomes context for the next question (an empty line
or end of input stops).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from piip.data.base import load_rgb
from piip.data.llava.dataset import ImageProcessor
from piip.errors import CheckpointError, ConfigError, DataError
from piip.run import build, checkpoints
from piip.run.cli import key_value_args, run_tool

USAGE = (
    "usage: python -m piip.tools.chat ckpt_path=PATH [image=FILE] [question=TEXT] [device=cpu|cuda] "
    "[max_new_tokens=N]"
)


def chat(
    ckpt_path: str,
    image: str | None = None,
    question: str | None = None,
    device: str | None = None,
    max_new_tokens: int = 64,
) -> list[str]:
    """The answers given (one with `question`, else one per line read from stdin)."""
    build.configure_cpu_math()
    checkpoint = Path(ckpt_path).expanduser().resolve()
    task = checkpoints.read_checkpoint(checkpoint, weights=False)["hyper_parameters"]["run_config"]["task"]
    if task.get("kind") != "multimodal":  # said before the model is built
        raise CheckpointError(
            f"{checkpoint} holds a {task.get('kind')} model ({task.get('name')}), not a multimodal one; "
            f"draw its predictions with python -m piip.tools.predict ckpt_path={checkpoint} image=…"
        )
    path = Path(image).expanduser() if image is not None else None
    if path is not None and not path.is_file():
        raise DataError(f"image={path}: no such file")
    saved, backbone, module = checkpoints.load_task_from_checkpoint(checkpoint)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    module.to(device).eval()
    pixels = None
    if path is not None:
        processor = ImageProcessor(
            backbone["resolutions"][0], saved.task.data.get("image_aspect_ratio", "pad")
        )
        pixels = processor(load_rgb(str(path)))
    template = saved.task.data.get("template", "vicuna_v1")
    questions = [question] if question is not None else _read_questions()
    history: list[tuple[str, str]] = []
    for text in questions:
        reply = module.answer(text, pixels, template, int(max_new_tokens), history)
        print(reply, flush=True)
        history.append((text, reply))
    return [answer for _, answer in history]


def _read_questions():
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line.strip():
            return
        yield line.strip()


def main(argv: list[str]) -> int:
    args = key_value_args(argv, ("ckpt_path",), ("image", "question", "device", "max_new_tokens"), USAGE)
    if "max_new_tokens" in args:
        if not args["max_new_tokens"].isdigit():
            raise ConfigError(f"max_new_tokens: expected a positive integer, got {args['max_new_tokens']!r}")
        args["max_new_tokens"] = int(args["max_new_tokens"])
    chat(**args)
    return 0


if __name__ == "__main__":
    run_tool("chat", main, sys.argv[1:])
