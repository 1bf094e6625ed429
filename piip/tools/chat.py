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
from omegaconf import OmegaConf

from piip.data.base import load_rgb
from piip.data.llava.dataset import ImageProcessor
from piip.errors import DataError
from piip.run import build, checkpoints

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
    saved, backbone, module = checkpoints.load_task_from_checkpoint(Path(ckpt_path).expanduser().resolve())
    if not hasattr(module, "answer"):
        raise SystemExit(
            f"{ckpt_path} holds a {saved.task.kind} model ({saved.task.name}), not a multimodal one"
        )
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    module.to(device).eval()
    pixels = None
    if image is not None:
        path = Path(image).expanduser()
        if not path.is_file():
            raise DataError(f"image={path}: no such file")
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


def main(argv: list[str]) -> None:
    args = OmegaConf.to_container(OmegaConf.from_cli(argv))
    unknown = sorted(set(args) - {"ckpt_path", "image", "question", "device", "max_new_tokens"})
    if "ckpt_path" not in args or unknown:
        raise SystemExit(f"{USAGE}\nunknown: {unknown}" if unknown else USAGE)
    chat(**{k: v if k == "max_new_tokens" else str(v) for k, v in args.items()})


if __name__ == "__main__":
    main(sys.argv[1:])
