"""Golden fixtures and key listings for PIIP-LLaVA, from the official code (llava/ in the PIIP checkout).

    python benchmarks/official/llava_fixtures.py /path/to/OpenGVLab/PIIP [--out tests/fixtures/official]

Writes `llava_<case>.pt`: a tiny official vision tower (`PIIPTwoBranchModel`: two Hugging Face CLIP branches,
or `PIIPTwoBranchMixModel`: CLIP + a timm ConvNeXt) and the official `TwoBranchMLP` projector with the
released `norm='gn'`, every weight randomised, their inputs and outputs; and `listings/<config>.json.gz` for
the 9 released `llava/configs/*.py`: key -> shape of the LLaVA checkpoint (`LlavaLlamaForCausalLM`: tower
under `model.vision_tower.vision_tower.`, projector under `model.mm_projector.`, Vicuna under `model.` and
`lm_head.`), built on the meta device.

Upstream ran transformers 4.37 and timm 1.0.11 with `replace_timm_convnext()` applied (ConvNeXt layer scales
named `weight`, not `gamma`). The shims below reproduce both on newer versions without touching the
official files: they only adapt loaders and call signatures, never the computation.
"""

from __future__ import annotations

import argparse
import gzip
import importlib
import json
import runpy
import sys
import tempfile
import types
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from listings import parameters_on_meta  # noqa: E402
from make_fixtures import INTERACTION, pack, randomise  # noqa: E402
from official_imports import load  # noqa: E402

DEFAULT_OUT = HERE.parents[1] / "tests/fixtures/official"

# Hugging Face CLIP vision configs: the tiny fixture branches and the released checkpoints' architectures
TINY_CLIP_L = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4)
TINY_CLIP_B = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2)
RELEASED_CLIP = {
    "openai/clip-vit-base-patch16": dict(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=224
    ),
    "OpenGVLab/clip-vit-large-patch14to16-224": dict(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=224
    ),
    "OpenGVLab/clip-vit-large-patch14to16-336": dict(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=336
    ),
}
# Vicuna-v1.5 (LLaMA-2 architecture): PAPER.md §6.4
VICUNA = {
    "7B": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, intermediate_size=11008),
    "13B": dict(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, intermediate_size=13824),
}
TOWER_PREFIX, PROJECTOR_PREFIX = "model.vision_tower.vision_tower.", "model.mm_projector."


# -- shims: upstream's loaders on today's libraries ----------------------------------------------------------
def _as_transformers_4(model: torch.nn.Module) -> torch.nn.Module:
    """transformers 5 changed two things upstream's `CLIPHFWrapper` relies on: `CLIPVisionModel` is the vision
    transformer itself (4.37 held it under `.vision_model`, with the same child names), and `CLIPEncoderLayer`
    returns a tensor and takes no `causal_attention_mask` (4.37 returned a tuple, of which the wrapper takes
    `[0]`). Same modules and computation, 4.37's access and call convention."""
    for layer in model.encoder.layers:

        def forward(hidden, attention_mask=None, causal_attention_mask=None, output_attentions=None, f=layer):
            out = type(f).forward(f, hidden, attention_mask)
            return out if isinstance(out, tuple) else (out,)

        layer.forward = forward
    holder = torch.nn.Module()
    holder.vision_model = model
    return holder


def _clip_loader(offline: bool) -> None:
    """`CLIPVisionModel.from_pretrained(path)` in upstream's wrapper: a local folder (fixtures), or, for the
    listings, the released architecture built without weights. Eager attention, as transformers 4.37 ran."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    module = sys.modules["official_llava_piip.clip_hf_wrapper"]

    class Loader:  # noqa: D101 - a loader shim only
        @staticmethod
        def from_pretrained(name: str, **kwargs):
            if offline:
                config = CLIPVisionConfig(patch_size=16, hidden_act="quick_gelu", **RELEASED_CLIP[name])
                return _as_transformers_4(CLIPVisionModel(config))
            model = CLIPVisionModel.from_pretrained(name, attn_implementation="eager", **kwargs)
            return _as_transformers_4(model)

    module.CLIPVisionModel = Loader


def _convnext_without_gamma(official: Path) -> None:
    """Upstream's training and evaluation entry points call `replace_timm_convnext()`, so its ConvNeXt blocks
    (and the released checkpoints) name the layer scale `weight`. Newer timm (1.0.31 here) passes device and
    dtype to blocks, which upstream's block class does not take: drop them (both are None here)."""
    import timm.models.convnext as timm_convnext

    root = official / "llava/llava"
    for name, folder in (("llava", root), ("llava.model", root / "model")):
        sys.modules.setdefault(name, types.ModuleType(name)).__path__ = [str(folder)]
    patch = importlib.import_module("llava.model.timm_convnext_monkey_patch")

    class Block(patch.ConvNeXtBlockWithoutGamma):  # noqa: D101 - a constructor shim only
        def __init__(self, *args, device=None, dtype=None, **kwargs):
            super().__init__(*args, **kwargs)

    timm_convnext.ConvNeXtBlock = Block


def _projector_module(official: Path) -> types.ModuleType:
    """`multimodal_projector/builder.py`, whose relative import reaches the already loaded piip_modules."""
    root = official / "llava/llava/model"
    for name, folder in (
        ("llava.model.multimodal_encoder", root / "multimodal_encoder"),
        ("llava.model.multimodal_encoder.piip", root / "multimodal_encoder/piip"),
        ("llava.model.multimodal_projector", root / "multimodal_projector"),
    ):
        sys.modules.setdefault(name, types.ModuleType(name)).__path__ = [str(folder)]
    sys.modules["llava.model.multimodal_encoder.piip.piip_modules"] = sys.modules[
        "official_llava_piip.piip_modules"
    ]
    return importlib.import_module("llava.model.multimodal_projector.builder")


def prepare(official: Path, offline: bool) -> tuple[dict, types.ModuleType]:
    official = Path(official).resolve()
    modules = load(official, "llava")
    _convnext_without_gamma(official)
    _clip_loader(offline)
    return modules, _projector_module(official)


def build_tower(modules: dict, backbone: dict) -> torch.nn.Module:
    """`PIIPVisionTower.load_model`: the model class named by `model_cls`, configured by the config dict."""
    config = modules["configuration_piip_2branch"].PIIPTwoBranchConfig(**json.loads(json.dumps(backbone)))
    if backbone.get("model_cls", "2branch_v1") == "2branch_v1":
        return modules["modeling_piip_2branch"].PIIPTwoBranchModel(config)
    return modules["modeling_piip_2branch_mix"].PIIPTwoBranchMixModel(config)


# -- golden cases --------------------------------------------------------------------------------------------
def clip_folder(scratch: Path, name: str, image_size: int, size: dict) -> str:
    """A tiny random `CLIPVisionModel` saved where upstream's wrapper loads it from."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(patch_size=16, image_size=image_size, hidden_act="quick_gelu", **size)
    CLIPVisionModel(config).save_pretrained(scratch / name)
    return str(scratch / name)


def cases(scratch: Path) -> dict[str, tuple[dict, dict, tuple[int, int]]]:
    """name -> (official backbone config, projector config, input size); the CLIP checkpoints' pretrain grid
    (64 / 16 = 4, 48 / 16 = 3) differs from every branch grid, so position embeddings are resampled."""
    torch.manual_seed(0)
    clip_l = clip_folder(scratch, "clip-l-tiny", 64, TINY_CLIP_L)
    clip_b = clip_folder(scratch, "clip-b-tiny", 64, TINY_CLIP_B)
    clip_b48 = clip_folder(scratch, "clip-b48-tiny", 48, TINY_CLIP_B)  # the mix case's ConvNeXt is large

    def clip(path: str, img_size: int, indexes: list) -> dict:
        return dict(
            model_type="clip_hf",
            img_size=img_size,
            patch_size=16,
            pretrain_patch_size=16,
            interaction_indexes=indexes,
            pretrained=path,
            use_cls_token=True,
        )

    two = dict(
        INTERACTION,
        model_cls="2branch_v1",
        branch1=clip(clip_l, 112, [[0, 1], [2, 3]]),  # 112 / 128 = 0.875, as 448 / 512
        branch2=clip(clip_b, 128, [[0, 0], [1, 3]]),
    )
    mix = dict(
        INTERACTION,
        model_cls="2branch_mix",
        branch1=clip(clip_b48, 64, [[0, 0], [1, 1], [2, 2], [3, 3]]),
        branch2=dict(  # timm test_convnext: 1 + (1+2) + (1+4) + (1+2) blocks, widths 24/32/48/64
            model_type="convnext_timm",
            img_size=128,
            interaction_indexes=[[0, 0], [1, 3], [4, 8], [9, 11]],
            downsample_ratios=[4, 8, 8, 8, 16, 16, 16, 16, 16, 32, 32, 32],
            pretrained="test_convnext",
            load_timm_weights=False,
        ),
    )
    gn = dict(type="separate_2branch_v1", norm="gn")
    return {
        "llava_2branch_clip": (two, dict(gn, dim1=48, dim2=32), (128, 128)),
        "llava_2branch_mix": (mix, dict(gn, dim1=32, dim2=64), (128, 128)),
    }


def run_case(modules: dict, projector_module, backbone: dict, projector: dict, size, seed: int) -> dict:
    torch.manual_seed(seed)
    tower = build_tower(modules, backbone).eval()
    mlp = projector_module.TwoBranchMLP(projector, 64).eval()
    randomise(tower, seed)
    randomise(mlp, seed + 100)
    image = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(seed + 1)).half().float()
    with torch.no_grad():
        maps = tower(image)
        tokens = mlp(maps)
    return {
        "official_backbone": backbone,
        "official_projector": projector,
        "state_dict": pack(tower.state_dict()),
        "projector_state_dict": pack(mlp.state_dict()),
        "inputs": [image.half()],
        "outputs": [m.float() for m in maps],  # (x1, x2): upstream's branch1 (low res) then branch2
        "projector_output": tokens.float(),
    }


def write_cases(official: Path, out: Path) -> None:
    modules, projector_module = prepare(official, offline=False)
    with tempfile.TemporaryDirectory() as scratch:
        for seed, (name, (backbone, projector, size)) in enumerate(cases(Path(scratch)).items()):
            record = run_case(modules, projector_module, backbone, projector, size, seed)
            for key in ("branch1", "branch2"):  # the folder is gone; keep its architecture instead
                branch = record["official_backbone"][key]
                if branch["model_type"] == "clip_hf":
                    folder = Path(branch["pretrained"])
                    branch["clip_config"] = json.loads((folder / "config.json").read_text())
                    branch["pretrained"] = folder.name
            torch.save(record, out / f"{name}.pt")
            shapes = [tuple(o.shape) for o in record["outputs"]]
            print(f"{name}: maps {shapes}, tokens {tuple(record['projector_output'].shape)}")


# -- listings of the released configs ------------------------------------------------------------------------
def llama_keys(size: str) -> dict[str, list[int]]:
    """Vicuna's `LlamaForCausalLM` keys, on the meta device (LLaVA's model keeps LLaMA's names)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32000, tie_word_embeddings=False, **VICUNA[size])
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def llava_listing(modules: dict, projector_module, path: Path) -> dict[str, list[int]]:
    model = runpy.run_path(str(path))["model"]
    backbone = dict(model["backbone"])
    for name in ("branch1", "branch2"):
        branch = backbone[name] = dict(backbone[name])
        if branch.get("model_type") == "convnext_timm":
            branch["load_timm_weights"] = False
    size = "13B" if path.stem.endswith("_13B") else "7B"
    with parameters_on_meta():
        tower = build_tower(modules, backbone)
        projector = projector_module.TwoBranchMLP(model["projector"], VICUNA[size]["hidden_size"])
    keys = {TOWER_PREFIX + k: list(v.shape) for k, v in tower.state_dict().items()}
    keys |= {PROJECTOR_PREFIX + k: list(v.shape) for k, v in projector.state_dict().items()}
    return keys | llama_keys(size)


def write_listings(official: Path, out: Path) -> None:
    modules, projector_module = prepare(official, offline=True)
    out.mkdir(parents=True, exist_ok=True)
    for path in sorted((Path(official).resolve() / "llava/configs").glob("*.py")):
        keys = llava_listing(modules, projector_module, path)
        record = {"config": str(path.relative_to(Path(official).resolve())), "keys": keys}
        # beside listings.py's format: the settings key shapes cannot show (block ranges, resolutions)
        record["official_model"] = runpy.run_path(str(path))["model"]
        text = json.dumps(record, indent=0, sort_keys=True) + "\n"
        (out / f"{path.stem}.json.gz").write_bytes(gzip.compress(text.encode(), mtime=0))
        print(f"{path.stem}: {len(keys)} keys")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("official", type=Path, help="root of an OpenGVLab/PIIP checkout")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--what", choices=("cases", "listings"), default=None)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.what in (None, "cases"):
        write_cases(args.official, args.out)
    if args.what in (None, "listings"):
        write_listings(args.official, args.out / "listings" / "llava")


if __name__ == "__main__":
    main()
