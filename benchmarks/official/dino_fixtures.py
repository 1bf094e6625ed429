"""Golden values of the official DINO neck and head (mmdet 2.x `ChannelMapper` + `DINOHead`).

python benchmarks/official/dino_fixtures.py /path/to/PIIP --deps /tmp/mmcv_deps [--out DIR]

Writes `DIR/dino_head.pt` (default DIR: tests/fixtures/official; ~290 KB) for `tests/test_official_dino.py`:
a tiny official neck and head (the layer sizes of `tests/test_dino.py`'s TINY) with random weights, random
stride-8/16/32 backbone maps of a padded batch holding two images of different sizes, and what upstream
computes from them: `DINOHead.forward` in evaluation (every decoder layer's logits and boxes, the encoder's
top-k), `get_bboxes` without and with rescaling, and a training-mode forward with denoising queries made by
upstream's own `CdnQueryGenerator` (plus a noise-free set of them, whose layout piip must reproduce exactly).

Unlike `mask_rcnn_parts.py` this imports the real libraries: the official tree ships the mmcv 1.7.0 it runs
with (`<official>/mmcv`, customised) next to `<official>/mmdetection`, and both import as they are. Only
what cannot exist on a CPU machine is stood in for: mmcv's compiled `_ext` (mmcv's
`MultiScaleDeformableAttention` runs mmcv's own `multi_scale_deformable_attn_pytorch` whenever the value is
not on CUDA, so the stand-in is never called), upstream's compiled backbone op, and `deepspeed` /
`flash_attn`, which the official runner and backbones import but the head never calls. The pure-Python
packages mmcv and mmdet import at load time go in a folder of their own, never the project's environment:

    pip install --target /tmp/mmcv_deps --no-deps addict yapf platformdirs opencv-python-headless six \
        einops terminaltables

Weights and maps are int8 codes times a power of two per tensor (exact in fp16 and bf16, half the bytes of
fp16: the file stays under 300 KB); outputs are float32. Running the script twice writes the same bytes.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.abc
import importlib.machinery
import math
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

SEED = 0
IN_CHANNELS = 32  # the backbone maps' width (the test feeds them to piip's neck directly)
TINY = dict(
    dim=64,
    num_heads=4,
    ffn_dim=128,
    num_queries=30,
    num_encoder_layers=1,
    num_decoder_layers=2,
    num_levels=4,
    num_points=4,
    num_dn=12,
    max_detections=50,
)
NUM_CLASSES = 3
BATCH_SHAPE = (128, 128)
IMAGE_SHAPES = [(128, 128), (96, 112)]  # (h, w) of each unpadded image in the padded batch
ORIGINAL_SHAPES = [(160, 160), (150, 140)]  # before the test-time resize: scale factors 0.8 and (0.8, 0.64)
STUBBED = ("deepspeed", "flash_attn", "MultiScaleDeformableAttention")  # top-level modules stood in for


class _Absent(types.ModuleType):
    """A module that is not there: its names exist (classes to subclass, functions) but raise when used."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)

        def absent(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError(f"{self.__name__}.{name} is not available on this machine")

        return type(name, (), {"__init__": absent}) if name[:1].isupper() else absent


class _AbsentFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports mmcv's compiled `_ext` and the `STUBBED` packages (any submodule) as `_Absent` modules."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name == "mmcv._ext" or name.split(".")[0] in STUBBED:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return _Absent(spec.name)

    def exec_module(self, module: types.ModuleType) -> None:
        module.__path__ = []


def load_official(official: Path, deps: Path | None) -> types.ModuleType:
    """Import the official mmcv and mmdet; returns `mmdet.models` (its registries are filled)."""
    official = official.resolve()
    for folder in ("mmcv", "mmdetection"):
        if not (official / folder).is_dir():
            raise FileNotFoundError(f"{official / folder}: not found; pass the root of a PIIP checkout")
    sys.path[:0] = [str(p) for p in (deps, official / "mmcv", official / "mmdetection") if p is not None]
    sys.meta_path.insert(0, _AbsentFinder())
    import mmcv
    import mmdet.models

    assert mmcv.__file__.startswith(str(official)), f"mmcv came from {mmcv.__file__}, not the official tree"
    return mmdet.models


def configs() -> tuple[dict, dict]:
    """The official 4-scale DINO config (configs/piip/*/dino_4scale_*.py), shrunk to TINY."""
    dim, heads = TINY["dim"], TINY["num_heads"]
    deformable = dict(
        type="MultiScaleDeformableAttention",
        embed_dims=dim,
        num_heads=heads,
        dropout=0.0,
        num_levels=TINY["num_levels"],
        num_points=TINY["num_points"],
    )
    neck = dict(
        type="ChannelMapper",
        in_channels=[IN_CHANNELS] * 3,
        kernel_size=1,
        out_channels=dim,
        act_cfg=None,
        norm_cfg=dict(type="GN", num_groups=32),
        num_outs=TINY["num_levels"],
    )
    # upstream sets the FFN by `feedforward_channels`/`ffn_dropout` over mmcv's 256-wide default `ffn_cfgs`
    ffn = dict(
        type="FFN",
        embed_dims=dim,
        feedforward_channels=TINY["ffn_dim"],
        num_fcs=2,
        ffn_drop=0.0,
        act_cfg=dict(type="ReLU", inplace=True),
    )
    encoder_layer = dict(
        type="BaseTransformerLayer",
        attn_cfgs=deformable,
        ffn_cfgs=dict(ffn),
        operation_order=("self_attn", "norm", "ffn", "norm"),
    )
    decoder_layer = dict(
        type="DetrTransformerDecoderLayer",
        attn_cfgs=[dict(type="MultiheadAttention", embed_dims=dim, num_heads=heads, dropout=0.0), deformable],
        feedforward_channels=TINY["ffn_dim"],
        ffn_dropout=0.0,
        ffn_cfgs=dict(ffn),
        operation_order=("self_attn", "norm", "cross_attn", "norm", "ffn", "norm"),
    )
    head = dict(
        type="DINOHead",
        num_query=TINY["num_queries"],
        num_classes=NUM_CLASSES,
        in_channels=2048,
        sync_cls_avg_factor=True,
        as_two_stage=True,
        with_box_refine=True,
        dn_cfg=dict(
            type="CdnQueryGenerator",
            noise_scale=dict(label=0.5, box=1.0),
            group_cfg=dict(dynamic=True, num_groups=None, num_dn_queries=TINY["num_dn"]),
        ),
        transformer=dict(
            type="DinoTransformer",
            two_stage_num_proposals=TINY["num_queries"],
            encoder=dict(
                type="DetrTransformerEncoder",
                num_layers=TINY["num_encoder_layers"],
                transformerlayers=encoder_layer,
            ),
            decoder=dict(
                type="DinoTransformerDecoder",
                num_layers=TINY["num_decoder_layers"],
                return_intermediate=True,
                transformerlayers=decoder_layer,
            ),
        ),
        positional_encoding=dict(
            type="SinePositionalEncoding", num_feats=dim // 2, temperature=20, normalize=True
        ),
        loss_cls=dict(type="FocalLoss", use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0),
        loss_bbox=dict(type="L1Loss", loss_weight=5.0),
        loss_iou=dict(type="GIoULoss", loss_weight=2.0),
        train_cfg=None,  # the assigner is for losses, which this fixture leaves out
        test_cfg=dict(max_per_img=TINY["max_detections"]),
    )
    return neck, head


def codes(values: torch.Tensor) -> tuple[torch.Tensor, int]:
    """float -> (int8 codes, e) with codes * 2**-e == the values' rounding to 8 bits below their maximum."""
    peak = float(values.abs().max())
    exponent = math.floor(math.log2(127 / peak)) if peak > 0 else 0
    return torch.round(values * 2.0**exponent).clamp(-127, 127).to(torch.int8), exponent


def decoded(code: torch.Tensor, exponent: int) -> torch.Tensor:
    return code.float() * 2.0**-exponent


def scale_of(key: str, shape: torch.Size) -> tuple[float, float]:
    """(mean, std) of a random parameter: fan-in scaled matrices, norms near one, embeddings N(0, 1), the
    box heads' last layers and offsets small enough that boxes and sampling points stay on the maps."""
    if key.endswith(("level_embeds", "query_embed.weight", "label_embedding.weight")):
        return 0.0, 1.0
    if ("norm" in key or ".gn." in key) and len(shape) == 1:
        return (1.0, 0.1) if key.endswith("weight") else (0.0, 0.1)
    if "sampling_offsets" in key:
        return (0.0, 1.0) if key.endswith("bias") else (0.0, 0.1)
    if "cls_branches" in key and key.endswith("bias"):
        return -2.0, 0.5
    if len(shape) == 1:
        return 0.0, 0.1
    std = 1 / math.sqrt(shape[1:].numel())
    return 0.0, std * (0.3 if key.split(".")[-2] == "4" else 1.0)  # reg_branches.{i}.4: the box layer


def randomise(modules: dict[str, torch.nn.Module], generator: torch.Generator) -> dict:
    """Give every parameter random 8-bit values; returns them packed (keys, shapes, one int8 buffer)."""
    keys, shapes, buffers, exponents = [], [], [], []
    for prefix, module in modules.items():
        for name, tensor in module.state_dict().items():
            key = f"{prefix}.{name}"
            mean, std = scale_of(key, tensor.shape)
            code, exponent = codes(mean + std * torch.randn(tensor.shape, generator=generator))
            tensor.copy_(decoded(code, exponent))
            keys.append(key)
            shapes.append(tuple(tensor.shape))
            buffers.append(code.flatten())
            exponents.append(exponent)
    return {"keys": keys, "shapes": shapes, "codes": torch.cat(buffers), "exponents": torch.tensor(exponents)}


def img_metas() -> list[dict]:
    """mmdet's test-time meta of each image: resized from ORIGINAL_SHAPES, padded to BATCH_SHAPE."""
    metas = []
    for (h, w), (oh, ow) in zip(IMAGE_SHAPES, ORIGINAL_SHAPES, strict=True):
        scale = np.array([w / ow, h / oh, w / ow, h / oh], dtype=np.float32)  # mmdet's Resize
        metas.append(
            dict(
                img_shape=(h, w, 3),
                ori_shape=(oh, ow, 3),
                pad_shape=(*BATCH_SHAPE, 3),
                batch_input_shape=BATCH_SHAPE,
                scale_factor=scale,
            )
        )
    return metas


@contextlib.contextmanager
def cuda_calls_stay_on_cpu() -> Iterator[None]:
    """Upstream's `CdnQueryGenerator` moves tensors with `.cuda()` / `.to('cuda')`; make both no-ops."""
    cuda, to = torch.Tensor.cuda, torch.Tensor.to

    def to_cpu(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        args = tuple("cpu" if isinstance(a, str) and a.startswith("cuda") else a for a in args)
        return to(self, *args, **kwargs)

    torch.Tensor.cuda, torch.Tensor.to = lambda self, *a, **k: self, to_cpu
    try:
        yield
    finally:
        torch.Tensor.cuda, torch.Tensor.to = cuda, to


def ground_truth() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Three objects in the first image, two in the second (xyxy pixels of the resized image)."""
    boxes = [
        torch.tensor([[10.0, 12.0, 60.0, 70.0], [64.0, 30.0, 120.0, 90.0], [30.0, 90.0, 52.0, 126.0]]),
        torch.tensor([[5.0, 8.0, 50.0, 40.0], [40.0, 44.0, 108.0, 94.0]]),
    ]
    return boxes, [torch.tensor([0, 2, 1]), torch.tensor([2, 2])]


def denoising(head: torch.nn.Module, metas: list[dict], noise: bool) -> tuple:
    """Upstream's denoising queries for `ground_truth()` (its generator draws from torch's global RNG)."""
    generator = head.dn_generator
    saved = generator.label_noise_scale, generator.box_noise_scale
    if not noise:
        generator.label_noise_scale = generator.box_noise_scale = 0.0
    generator.train()
    torch.manual_seed(SEED)
    with cuda_calls_stay_on_cpu(), torch.no_grad():
        found = generator(*ground_truth(), head.label_embedding, metas)
    generator.label_noise_scale, generator.box_noise_scale = saved
    return found


def margins(values: torch.Tensor, count: int) -> float:
    """Smallest gap between neighbours among the `count + 1` largest values of each row: a top-k whose
    order a 1e-6 change could flip would make the comparison meaningless."""
    top = values.flatten(1).topk(min(count + 1, values.flatten(1).shape[1]), dim=1).values
    return float((top[:, :-1] - top[:, 1:]).min())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("official", type=Path, help="the official PIIP code (mmcv/, mmdetection/)")
    parser.add_argument("--deps", type=Path, help="folder holding mmcv's pure-Python dependencies")
    parser.add_argument("--out", type=Path, default=Path("tests/fixtures/official"))
    args = parser.parse_args()
    models = load_official(args.official, args.deps)
    torch.manual_seed(SEED)
    neck_cfg, head_cfg = configs()
    neck, head = models.build_neck(neck_cfg).eval(), models.build_head(head_cfg).eval()
    generator = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        state = randomise({"neck": neck, "bbox_head": head}, generator)
    maps, map_codes = [], []
    for stride in (8, 16, 32):
        code, exponent = codes(
            torch.randn(
                2, IN_CHANNELS, BATCH_SHAPE[0] // stride, BATCH_SHAPE[1] // stride, generator=generator
            )
        )
        maps.append(decoded(code, exponent))
        map_codes.append((code, exponent))
    metas = img_metas()
    with torch.no_grad():
        features = list(neck(maps))
        logits, boxes, enc_logits, enc_boxes = head(features, metas)
        detections = {}
        for rescale in (False, True):
            found = head.get_bboxes(logits, boxes, enc_logits, enc_boxes, metas, rescale=rescale)
            detections[rescale] = [
                {"boxes": b[:, :4], "scores": b[:, 4], "labels": labels} for b, labels in found
            ]
        label_query, box_query, attn_mask, meta = denoising(head, metas, noise=True)
        head.train()
        train_logits, train_boxes, _, _ = head(features, metas, label_query, box_query, attn_mask)
        head.eval()
        clean = denoising(head, metas, noise=False)
    gaps = {
        "encoder top-k": margins(enc_logits.max(-1).values, TINY["num_queries"]),
        "detections": margins(logits[-1].sigmoid(), TINY["max_detections"]),
    }
    print("smallest gaps between neighbouring top-k values:", gaps)
    assert min(gaps.values()) > 1e-5, "near-ties in a top-k: pick another SEED"
    gt_boxes, gt_labels = ground_truth()
    fixture = {
        "source": "the official tree's mmcv 1.7.0 + mmdetection 2.x (benchmarks/official/dino_fixtures.py)",
        "config": dict(TINY, num_classes=NUM_CLASSES, in_channels=IN_CHANNELS),
        "state": state,
        "maps": [code for code, _ in map_codes],
        "map_exponents": [exponent for _, exponent in map_codes],
        "image_sizes": IMAGE_SHAPES,
        "original_sizes": ORIGINAL_SHAPES,
        "batch_shape": BATCH_SHAPE,
        # DINOHead.forward's all_cls_scores, all_bbox_preds, enc_topk_scores, enc_topk_anchors
        "eval": {"logits": logits, "boxes": boxes, "enc_logits": enc_logits, "enc_boxes": enc_boxes},
        "detections": detections[False],
        "detections_rescaled": detections[True],
        "gt_boxes": gt_boxes,
        "gt_labels": gt_labels,
        "train": {
            "label_query": label_query.half(),
            "box_query": box_query,
            "attn_mask": attn_mask,
            "pad_size": meta["pad_size"],
            "num_groups": meta["num_dn_group"],
            "logits": train_logits,
            "boxes": train_boxes,
        },
        "clean_denoising": {
            "label_query": clean[0].half(),
            "box_query": clean[1],
            "attn_mask": clean[2],
            "pad_size": clean[3]["pad_size"],
            "num_groups": clean[3]["num_dn_group"],
        },
    }
    assert torch.equal(label_query.half().float(), label_query), "label queries are label_embedding rows"
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "dino_head.pt"
    torch.save(fixture, path)
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
