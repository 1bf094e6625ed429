"""Golden fixtures from the official PIIP code: tiny random-weight backbones in the official layouts, their
inputs and outputs, and the key/shape listing of every released backbone config.

    python benchmarks/official/make_fixtures.py /path/to/OpenGVLab/PIIP [--out tests/fixtures/official]

Needs the official checkout (commit 7a8eceb or later) plus `einops` and `transformers`; no mmcv, mmdet or
CUDA (see official_imports.py). Each code base runs in its own subprocess. Writes, per case, `<case>.pt`
(official kwargs, state dict, inputs, outputs) and, per released config, `listings/<config>.json` (key ->
shape of the official backbone built on the meta device). piip's tests convert these and compare.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from official_imports import CODE_BASES, load, sequential_downsampling  # noqa: E402

DEFAULT_OUT = HERE.parents[1] / "tests/fixtures/official"


# -- tiny branch settings in the official kwargs ----------------------------------------------------------
def deit(dim: int, heads: int, depth: int, size: int, indexes, windows=None, **extra) -> dict:
    """An official `vit_models` branch (DeiT / DeiT III layout: gamma_1/gamma_2 layer scale)."""
    windows = windows or [None] * depth
    return dict(
        real_size=size,
        pretrain_img_size=224,
        patch_size=16,
        pretrain_patch_size=16,
        depth=depth,
        embed_dim=dim,
        num_heads=heads,
        mlp_ratio=4,
        qkv_bias=True,
        drop_path_rate=0.0,
        init_scale=1.0,
        with_fpn=False,
        interaction_indexes=indexes,
        pretrained="deit_tiny_fixture.pth",
        window_attn=[w is not None for w in windows],
        window_size=[w or -1 for w in windows],
        **extra,
    )


def internvit(dim: int, heads: int, depth: int, size: int, indexes, *, qk_norm: bool, rms: bool, **extra):
    """An official `InternViT6B` branch: InternViT-6B itself (RMSNorm, qk-norm, no qkv bias, layer scale 0.1)
    or, with LayerNorm and qkv bias, the MAE-H branch of PIIP-H6B."""
    return dict(
        real_size=size,
        pretrain_img_size=224,
        patch_size=16,
        pretrain_patch_size=14,
        depth=depth,
        embed_dim=dim,
        num_heads=heads,
        mlp_ratio=4,
        qkv_bias=not qk_norm,
        init_values=0.1 if qk_norm else 1.0,
        qk_normalization=qk_norm,
        norm_layer_type="RMSNorm" if rms else "LayerNorm",
        use_flash_attn=False,
        with_cp=False,
        drop_path_rate=0.0,
        interaction_indexes=indexes,
        pretrained="internvit_fixture.pth",
        **extra,
    )


INTERACTION = dict(
    n_points=4,
    deform_num_heads=4,
    cffn_ratio=0.25,
    deform_ratio=0.5,
    with_cffn=True,
    interact_attn_type="deform",
    interaction_drop_path_rate=0.0,
)
TWO = [[0, 0], [1, 1]]
SQUARE, WIDE = (112, 112), (112, 80)  # WIDE: fractional branch sizes (80 * 80 / 112 = 57.1)


def convnext_folder(scratch: Path) -> str:
    """A tiny Hugging Face ConvNeXt saved where `ConvNextModel.from_pretrained` finds it (name holds
    'convnext', which selects the official ConvNeXt wrapper)."""
    from transformers import ConvNextConfig, ConvNextModel

    folder = scratch / "convnext-tiny-fixture"
    config = ConvNextConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 2, 1], layer_scale_init_value=0.5)
    torch.manual_seed(0)
    ConvNextModel(config).save_pretrained(folder)
    return str(folder)


def patch_convnext_loading(modules: dict) -> None:
    """The official ConvNeXt wrapper, fed by today's transformers (see `sequential_downsampling`)."""
    wrapper = vars(modules["piip_3branch"]).get("ConvNextHFWrapper")
    if wrapper is None:
        return
    module = sys.modules[wrapper.__module__]
    original = module.ConvNextModel

    class ConvNextModel(original):  # noqa: D101 - a loader shim only
        @classmethod
        def from_pretrained(cls, *args, **kwargs):
            return sequential_downsampling(original.from_pretrained(*args, **kwargs))

    module.ConvNextModel = ConvNextModel


def cases(code_base: str, scratch: Path) -> dict[str, tuple[str, dict, list[tuple[int, int]]]]:
    """name -> (official class, kwargs, input sizes) for one code base."""
    if code_base == "classification":

        def cls_branch(dim: int, heads: int, size: int, model_type: str = "deit") -> dict:
            kwargs = deit(dim, heads, 2, size, TWO, use_cls_token=True, model_type=model_type)
            for key in ("real_size", "with_fpn", "window_attn", "window_size", "init_scale"):
                kwargs.pop(key)
            if model_type == "augreg":  # upstream loads AugReg ViTs into its InternViT6B class
                kwargs.update(
                    init_values=1.0, qk_normalization=False, norm_layer_type="LayerNorm", use_flash_attn=False
                )
            return dict(kwargs, img_size=size, pretrained=None, num_classes=10)

        deits = dict(
            branch1=cls_branch(32, 2, 48), branch2=cls_branch(32, 2, 80), branch3=cls_branch(32, 1, 112)
        )
        augregs = dict(
            branch1=cls_branch(32, 2, 48, "augreg"),
            branch2=cls_branch(32, 2, 80, "augreg"),
            branch3=cls_branch(32, 1, 112, "augreg"),
        )
        three = "piip_3branch.PIIPThreeBranch"

        def tiny(dim: int, depth: int, size: int) -> dict:  # conf/branch/tiny_vit_*.yaml in upstream's class
            kwargs = cls_branch(dim, 2, size, "augreg")
            indexes = [[0, 0], [1, 1]] if depth == 2 else [[0, 1], [2, 3]]
            return dict(
                kwargs,
                depth=depth,
                mlp_ratio=2,
                init_values=None,
                use_cls_token=False,
                interaction_indexes=indexes,
                num_classes=8,
            )

        # the quick start's model (model=piip_tiny task=shapes) in upstream's layout, for the converter's
        # end-to-end test: python -m piip.tools.convert … task=shapes
        shapes = dict(  # widths 32 and depth 2 everywhere (the test says so with overrides): a small file
            INTERACTION,
            separate_head=False,
            num_classes=8,
            branch1=tiny(32, 2, 32),
            branch2=tiny(32, 2, 48),
            branch3=tiny(32, 2, 64),
        )
        cases = {"e2e_shapes_piip_tiny": (three, shapes, [(64, 64)])}
        return {
            "cls_3branch_deit_separate_head": (
                three,
                dict(INTERACTION, separate_head=True, num_classes=10, **deits),
                [SQUARE],
            ),
            "cls_3branch_augreg_separate_head": (
                three,
                dict(INTERACTION, separate_head=True, num_classes=10, **augregs),
                [SQUARE],
            ),
            "cls_3branch_deit_merged_head": (
                three,
                dict(INTERACTION, separate_head=False, num_classes=10, **deits),
                [SQUARE],
            ),
        } | cases  # last: the seeds of the cases above stay as they were
    if code_base == "mmdetection":
        tsb = dict(
            branch1=deit(32, 2, 4, 48, [[0, 1], [2, 3]], windows=[3, None] * 2),
            branch2=deit(24, 2, 2, 80, TWO, windows=[3, None]),
            branch3=deit(16, 1, 2, 112, TWO, windows=[3, None]),
        )
        four = dict(
            branch1=deit(32, 2, 2, 48, TWO, windows=[3, None]),
            branch2=deit(24, 2, 2, 64, TWO, windows=[3, None]),
            branch3=deit(16, 1, 2, 80, TWO, windows=[3, None]),
            branch4=deit(8, 1, 2, 112, TWO, windows=[3, None]),  # upstream builds it from branch3's settings
        )
        four_idx = [[0, 0], [1, 1], [2, 2], [3, 3]]
        hybrid = dict(
            with_simple_fpn=False,
            out_interaction_indexes=[0, 1, 2],
            branch1=deit(32, 2, 4, 64, four_idx, windows=[3, None] * 2),
            branch2=deit(24, 2, 4, 96, four_idx, windows=[3, None] * 2),
            branch3=dict(
                real_size=128,
                pretrained=convnext_folder(scratch),
                interaction_indexes=[[0, 0], [1, 2], [3, 5], [6, 7]],
                downsample_ratios=[4, 8, 8, 16, 16, 16, 32, 32],  # per block; the 2nd, 4th and 7th downsample
            ),
        )
        baseline = deit(32, 2, 4, 112, [[0, 3]], windows=[3, 3, None, 3])  # upstream's ViT-B/L baseline
        for key in ("real_size", "interaction_indexes"):
            baseline.pop(key)
        baseline.update(with_fpn=True, out_indices=[3])
        h6b = dict(
            branch1=internvit(32, 2, 4, 48, [[0, 1], [2, 3]], qk_norm=True, rms=True),
            branch2=deit(16, 1, 2, 112, TWO),
        )
        return {
            "det_2branch_internvit": ("piip_2branch.PIIPTwoBranch", dict(INTERACTION, **h6b), [SQUARE, WIDE]),
            "det_3branch_deit": ("piip_3branch.PIIPThreeBranch", dict(INTERACTION, **tsb), [SQUARE, WIDE]),
            "det_4branch_deit": ("piip_4branch.PIIPFourBranch", dict(INTERACTION, **four), [SQUARE, WIDE]),
            "det_3branch_convnext_regular_fpn": (
                "piip_3branch.PIIPThreeBranch",
                dict(INTERACTION, **hybrid),
                [(128, 128), (128, 96)],
            ),
            "det_1branch_vit_baseline": (
                "deit.vit_models",
                baseline,
                [SQUARE, WIDE],
            ),  # last: seeds above stay
        }
    if code_base == "mmsegmentation":
        seg = dict(
            INTERACTION,
            interaction_proj=False,
            norm_layer="none",
            branch1=internvit(32, 2, 4, 48, [[0, 1], [2, 3]], qk_norm=True, rms=True, img_size=48),
            branch2=internvit(16, 1, 2, 112, TWO, qk_norm=False, rms=False, img_size=112),
        )
        # mmseg's branches hold position embeddings at their own resolution: inputs are the crop size
        return {"seg_2branch_internvit": ("piip_2branch.PIIPTwoBranch", seg, [SQUARE])}
    return {}


@torch.no_grad()
def randomise(module: torch.nn.Module, seed: int) -> None:
    """Every floating tensor moved off its initial value (zero gammas would hide the interactions)."""
    generator = torch.Generator().manual_seed(seed)
    for tensor in module.state_dict().values():
        if tensor.is_floating_point():
            tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.05)
            tensor.copy_(tensor.half().float())  # fp16-exact values: the fixture stores them in half


def pack(state_dict: dict[str, torch.Tensor]) -> dict:
    """One fp16 buffer for all floating tensors (hundreds of small tensors cost more in a zip than their
    data); integer buffers stay as they are. The weights are fp16-exact, so nothing is lost."""
    floats = {k: v for k, v in state_dict.items() if v.is_floating_point()}
    return {
        "keys": list(floats),
        "shapes": [list(v.shape) for v in floats.values()],
        "values": torch.cat([v.reshape(-1) for v in floats.values()]).half(),
        "other": {k: v for k, v in state_dict.items() if not v.is_floating_point()},
    }


def run_case(modules: dict, class_path: str, kwargs: dict, sizes: list[tuple[int, int]], seed: int) -> dict:
    file, name = class_path.split(".")
    torch.manual_seed(seed)  # the constructors' own initialisation: the same fixture on every run
    model = getattr(modules[file], name)(**json.loads(json.dumps(kwargs))).eval()
    randomise(model, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    inputs = [torch.randn(1, 3, *size, generator=generator).half().float() for size in sizes]
    with torch.no_grad():
        outputs = [model(x) for x in inputs]
    outputs = [
        [o.float() for o in out] if isinstance(out, (list, tuple)) else [out.float()] for out in outputs
    ]
    return {
        "official_class": class_path,
        "official_kwargs": kwargs,
        "state_dict": pack(model.state_dict()),
        "inputs": [x.half() for x in inputs],
        "outputs": outputs,
    }


def write_cases(official: Path, code_base: str, out: Path) -> None:
    import tempfile

    modules = load(official, code_base)
    if code_base == "mmdetection":
        patch_convnext_loading(modules)
    with tempfile.TemporaryDirectory() as scratch:
        for seed, (name, (class_path, kwargs, sizes)) in enumerate(cases(code_base, Path(scratch)).items()):
            record = run_case(modules, class_path, kwargs, sizes, seed)
            if "convnext" in (kwargs.get("branch3", {}).get("pretrained") or ""):
                record["official_kwargs"]["branch3"]["pretrained"] = "convnext-tiny-fixture"
                record["convnext_config"] = dict(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 2, 1])
            torch.save(record, out / f"{name}.pt")
            shapes = [tuple(o.shape) for o in record["outputs"][0]]
            print(f"{name}: {len(record['state_dict']['keys'])} tensors, outputs {shapes}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("official", type=Path, help="root of an OpenGVLab/PIIP checkout")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--code-base", choices=CODE_BASES, help="(internal) one code base in this process")
    parser.add_argument("--what", choices=("cases", "listings"), default=None)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.code_base:
        if args.what in (None, "cases"):
            write_cases(args.official, args.code_base, args.out)
        if args.what in (None, "listings"):
            from listings import write_listings

            write_listings(args.official, args.code_base, args.out / "listings")
        return
    for code_base in CODE_BASES:
        command = [
            sys.executable,
            __file__,
            str(args.official),
            "--out",
            str(args.out),
            "--code-base",
            code_base,
        ]
        if args.what:
            command += ["--what", args.what]
        subprocess.run(command, check=True)


if __name__ == "__main__":
    main()
