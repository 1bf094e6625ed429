"""The official PIIP configs and checkpoints behind piip's experiments (PAPER.md §3, §4.4).

`python -m piip.tools.convert` names the official config of the experiment it converts for, the README's
"Released checkpoints" table lists these rows, and the conversion test checks every one against the key
listing that `benchmarks/official/make_fixtures.py` wrote from the official code (PIIP-LLaVA:
`RELEASED_LLAVA`, listings by `benchmarks/official/llava_fixtures.py`, tests/test_convert_released_llava.py).
"""

from __future__ import annotations

from dataclasses import dataclass

HUB = "https://huggingface.co/OpenGVLab/PIIP/resolve/main"


@dataclass(frozen=True)
class Released:
    """One piip experiment and the official config (and released checkpoint, if any) it reproduces."""

    experiment: str
    official_config: str  # path inside github.com/OpenGVLab/PIIP
    checkpoint: str | None  # download URL; None where only the config was published
    reported: str  # the paper's figures for the released weights

    @property
    def config_name(self) -> str:
        return self.official_config.rsplit("/", 1)[-1].removesuffix(".py")


def _det(
    experiment: str, config: str, reported: str, released: bool = True, branches: int | None = None
) -> Released:
    """`branches`: the branch count, where the experiment's name holds other numbers (`sbl_384`)."""
    branches = branches or _branches(experiment)
    folder = f"{branches}branch" if branches > 1 else "baseline"
    folder = "convnext" if "regular-fpn" in config and folder != "baseline" else folder
    path = f"mmdetection/configs/piip/{folder}/{config}.py"
    return Released(experiment, path, f"{HUB}/detection/{config}.pth" if released else None, reported)


def _branches(experiment: str) -> int:
    """Upstream files its configs by branch count: the number of resolutions in the experiment's name."""
    return sum(part.isdigit() for part in experiment.split("_"))


def _seg(experiment: str, config: str, reported: str) -> Released:
    folder = "2branch" if _branches(experiment) > 1 else "baseline"
    path = f"mmsegmentation/configs/piip/{folder}/{config}.py"
    return Released(experiment, path, f"{HUB}/segmentation/{config}.pth", reported)


def _cls(experiment: str, config: str, reported: str) -> Released:
    return Released(
        experiment, f"classification/configs/{config}.py", f"{HUB}/classification/{config}.pth", reported
    )


RELEASED: tuple[Released, ...] = (
    _cls("imagenet_piip_tsb_368_192_128", "piip_3branch_tsb_368-192-128_cls_token_deit1", "top-1 82.1"),
    _cls("imagenet_piip_sbl_augreg_320_160_96", "piip_3branch_sbl_320-160-96_cls_token_augreg", "top-1 85.2"),
    _cls(
        "imagenet_piip_sbl_augreg_384_192_128", "piip_3branch_sbl_384-192-128_cls_token_augreg", "top-1 85.9"
    ),
    _det(
        "coco_piip_tsb_1120_896_448",
        "mask_rcnn_deit_tsb_1120_896_448_fpn_1x_coco_bs16",
        "box 43.6, mask 38.7",
    ),
    _det(
        "coco_piip_tsb_1568_896_448",
        "mask_rcnn_deit_tsb_1568_896_448_fpn_1x_coco_bs16",
        "box 45.0, mask 40.3",
    ),
    _det(
        "coco_piip_tsb_1568_1120_672",
        "mask_rcnn_deit_tsb_1568_1120_672_fpn_1x_coco_bs16",
        "box 46.5, mask 41.3",
    ),
    _det(
        "coco_piip_sbl_1120_672_448",
        "mask_rcnn_deit_sbl_1120_672_448_fpn_1x_coco_bs16",
        "box 46.5, mask 40.8",
    ),
    _det(
        "coco_piip_sbl_1344_896_448",
        "mask_rcnn_deit_sbl_1344_896_448_fpn_1x_coco_bs16",
        "box 48.3, mask 42.7",
    ),
    _det(
        "coco_piip_sbl_1568_896_672",
        "mask_rcnn_deit_sbl_1568_896_672_fpn_1x_coco_bs16",
        "box 49.3, mask 43.7",
    ),
    _det(
        "coco_piip_sbl_1568_1120_672",
        "mask_rcnn_deit_sbl_1568_1120_672_fpn_1x_coco_bs16",
        "box 50.0, mask 44.4",
    ),
    _det(
        "coco_piip_tsbl_1344_896_672_448",
        "mask_rcnn_deit_tsbl_1344_896_672_448_fpn_1x_coco_bs16",
        "box 47.1, mask 41.9",
    ),
    _det(
        "coco_piip_tsbl_1568_1120_672_448",
        "mask_rcnn_deit_tsbl_1568_1120_672_448_fpn_1x_coco_bs16",
        "box 48.2, mask 42.9",
    ),
    _det(
        "coco_piip_tsbl_1792_1568_1120_448",
        "mask_rcnn_deit_tsbl_1792_1568_1120_448_fpn_1x_coco_bs16",
        "box 49.4, mask 44.1",
    ),
    _det(
        "coco_piip_h6b_1024_512",
        "mask_rcnn_internvit_h6b_1024_512_fpn_1x_coco_bs16_ms",
        "box 55.8, mask 49.0",
    ),
    _det(
        "coco_piip_h6b_speedup_1024_512",
        "mask_rcnn_internvit_h6b_1024_512_fpn_1x_coco_bs16_ms_speedup",
        "box 55.6, mask 49.0",
        released=False,
    ),
    _det(
        "coco_piip_lh6b_1536_1024_512",
        "mask_rcnn_internvit_lh6b_1536_1024_512_fpn_1x_coco_bs32_ms",
        "not in the paper's tables",
        released=False,
    ),
    _det(
        "coco_piip_sbl_augreg_1568_1120_672",
        "mask_rcnn_augreg_sbl_1568_1120_672_fpn_1x_coco_bs16",
        "box 48.3, mask 42.6",
    ),
    _det(
        "coco_piip_sbl_augreg_speedup_1568_1120_672",
        "mask_rcnn_augreg_sbl_1568_1120_672_fpn_1x_coco_bs16_speedup",
        "box 48.1, mask 42.4",
        released=False,
    ),
    _det(
        "coco_piip_sbl_mae_1568_1120_672",
        "mask_rcnn_mae_sbl_1568_1120_672_fpn_1x_coco_bs16",
        "box 49.1, mask 43.0",
    ),
    _det(
        "coco_piip_sbl_dinov2_1568_1120_672",
        "mask_rcnn_dinov2_sbl_1568_1120_672_fpn_1x_coco_bs16",
        "box 51.0, mask 44.7",
    ),
    _det(
        "coco_piip_sbl_beitv2_1568_1120_672",
        "mask_rcnn_beit_sbl_1568_1120_672_fpn_1x_coco_bs16",
        "box 51.8, mask 45.4",
    ),
    _det(
        "coco_piip_sbl_uniperceiver_1568_1120_672",
        "mask_rcnn_uniperceiver_sbl_1568_1120_672_fpn_1x_coco_bs16",
        "box 48.8, mask 42.9",
    ),
    _det(
        "coco_piip_ct_cs_cb_1024_672_448",
        "mask_rcnn_convnext-tsb_1024_672_448_regular-fpn",
        "box 46.4, mask 41.7",
    ),
    _det(
        "coco_piip_ct_vs_vb_1024_672_448",
        "mask_rcnn_convnext-t_vit-s_vit-b_1024_672_448_regular-fpn",
        "box 47.1, mask 42.4",
        released=False,
    ),
    _det(
        "coco_piip_ct_cs_vb_1024_672_448",
        "mask_rcnn_convnext-t_convnext-s_vit-b_1024_672_448_regular-fpn",
        "box 46.8, mask 42.2",
        released=False,
    ),
    _det(
        "coco_piip_ct_vs_cb_1024_672_448",
        "mask_rcnn_convnext-t_vit-s_convnext-b_1024_672_448_regular-fpn",
        "box 46.7, mask 42.0",
        released=False,
    ),
    _det(
        "coco_piip_vt_cs_vb_1024_672_448",
        "mask_rcnn_vit-t_convnext-s_vit-b_1024_672_448_regular-fpn",
        "box 45.4, mask 40.9",
        released=False,
    ),
    _det(
        "coco_piip_vt_cs_cb_1024_672_448",
        "mask_rcnn_vit-t_convnext-s_convnext-b_1024_672_448_regular-fpn",
        "box 45.2, mask 40.7",
        released=False,
    ),
    _det(
        "coco_piip_vt_vs_cb_1024_672_448",
        "mask_rcnn_vit-t_vit-s_convnext-b_1024_672_448_regular-fpn",
        "box 44.8, mask 40.3",
        released=False,
    ),
    # DINO ("More ViT variants" table; LH6B: config only)
    _det(
        "coco_dino_piip_sbl_384_1792_1120_672",
        "dino_4scale_deit_384_sbl_1792_1120_672_fpn_3x_coco_bs32_ms",
        "box 57.8",
        branches=3,
    ),
    _det("coco_dino_piip_h6b_1024_768", "dino_4scale_internvit_h6b_1024_768_fpn_1x_coco_bs32_ms", "box 60.0"),
    _det(
        "coco_dino_piip_lh6b_1536_1024_512",
        "dino_4scale_internvit_lh6b_1536_1024_512_fpn_2x_coco_bs32_ms",
        "not in the paper's tables",
        released=False,
    ),
    # single-branch baselines of the same tables
    _det("coco_vit_b_1024", "mask_rcnn_deit_vit_b_fpn_1x_coco_bs16", "box 43.7, mask 39.7"),
    _det("coco_vit_l_1024", "mask_rcnn_deit_vit_l_fpn_1x_coco_bs16", "box 46.7, mask 42.5"),
    _det("coco_internvit_6b_1024", "mask_rcnn_internvit_6b_fpn_1x_coco_bs16_ms", "box 53.8, mask 48.1"),
    _det(
        "coco_convnext_b_1024",
        "mask_rcnn_convnext-base_1024_regular-fpn",
        "box 42.4, mask 38.7",
        released=False,
    ),
    _seg("ade20k_internvit_6b_512", "upernet_internvit_6b_512_80k_ade20k_bs16_lr4e-5", "mIoU 58.42"),
    _seg("ade20k_piip_h6b_512_192", "upernet_internvit_h6b_192_512_80k_ade20k_bs16_lr4e-5", "mIoU 57.81"),
    _seg("ade20k_piip_h6b_512_256", "upernet_internvit_h6b_256_512_80k_ade20k_bs16_lr4e-5", "mIoU 58.35"),
    _seg("ade20k_piip_h6b_512_384", "upernet_internvit_h6b_384_512_80k_ade20k_bs16_lr4e-5", "mIoU 59.32"),
    _seg("ade20k_piip_h6b_512_512", "upernet_internvit_h6b_512_512_80k_ade20k_bs16_lr4e-5", "mIoU 59.85"),
)

# PIIP-LLaVA (PAPER.md §3.6, §6.5): Hugging Face folders in LLaVA's `LlavaLlamaForCausalLM` layout (vision
# tower, projector and Vicuna in one model). Kept apart from RELEASED: converting them needs a Vicuna-shaped
# language model folder (`paths.pretrained_dir`), and their checkpoints are repositories, not files under HUB.
LLAVA_HUB = "https://huggingface.co/OpenGVLab"
LLAVA_BENCHMARKS = ("MMB-EN", "MMVet", "TextVQA", "SQA-I", "GQA", "VQAv2", "SEED-I", "POPE")


def _llava(experiment: str, config: str, repo: str, scores: tuple[float, ...]) -> Released:
    """`scores`: the README's eight benchmark numbers, then their average."""
    *numbers, average = scores
    reported = ", ".join(f"{b} {n:.1f}" for b, n in zip(LLAVA_BENCHMARKS, numbers, strict=True))
    return Released(
        experiment, f"llava/configs/{config}.py", f"{LLAVA_HUB}/{repo}", f"{reported} (avg {average:.1f})"
    )


RELEASED_LLAVA: tuple[Released, ...] = (
    _llava(
        "llava_piip_clip_bl_512_256_7b",
        "piip-llava_clip-bl_512-256_7B",
        "PIIP-LLaVA_CLIP-BL_512-256_7B",
        (63.8, 32.0, 57.9, 68.8, 62.8, 79.1, 67.3, 86.5, 64.8),
    ),
    _llava(
        "llava_piip_cnxb_clipl_640_224_7b",
        "piip-llava_convnext-b_clip-l_640-224_7B",
        "PIIP-LLaVA_ConvNeXt-B_CLIP-L_640-224_7B",
        (64.5, 31.9, 59.0, 68.3, 62.1, 79.9, 67.5, 86.5, 65.0),
    ),
    _llava(
        "llava_piip_clip_bl_512_448_7b",
        "piip-llava_clip-bl_512-448_7B",
        "PIIP-LLaVA_CLIP-BL_512-448_7B",
        (66.2, 30.5, 59.5, 68.0, 63.7, 80.3, 69.0, 87.3, 65.6),
    ),
    _llava(
        "llava_piip_cnxb_clipl_1024_336_7b",
        "piip-llava_convnext-b_clip-l_1024-336_7B",
        "PIIP-LLaVA_ConvNeXt-B_CLIP-L_1024-336_7B",
        (67.5, 31.5, 63.1, 68.1, 62.7, 81.1, 69.0, 87.9, 66.4),
    ),
    _llava(
        "llava_piip_cnxl_clipl_1024_336_7b",
        "piip-llava_convnext-l_clip-l_1024-336_7B",
        "PIIP-LLaVA_ConvNeXt-L_CLIP-L_1024-336_7B",
        (67.0, 31.4, 67.1, 68.3, 63.9, 81.5, 69.4, 88.2, 67.1),
    ),
    _llava(
        "llava_plus_piip_cnxl_clipl_1024_336_7b",
        "piip-llava-plus_convnext-l_clip-l_1024-336_7B",
        "PIIP-LLaVA-Plus_ConvNeXt-L_CLIP-L_1024-336_7B",
        (74.5, 44.7, 73.0, 95.0, 62.9, 82.3, 72.1, 87.5, 74.0),
    ),
    _llava(
        "llava_piip_clip_bl_512_448_13b",
        "piip-llava_clip-bl_512-448_13B",
        "PIIP-LLaVA_CLIP-BL_512-448_13B",
        (67.6, 36.1, 61.6, 71.0, 64.5, 81.2, 69.5, 87.2, 67.3),
    ),
    _llava(
        "llava_piip_cnxb_clipl_1024_336_13b",
        "piip-llava_convnext-b_clip-l_1024-336_13B",
        "PIIP-LLaVA_ConvNeXt-B_CLIP-L_1024-336_13B",
        (68.5, 37.7, 64.2, 71.1, 64.2, 81.8, 69.3, 87.9, 68.0),
    ),
    _llava(
        "llava_piip_cnxl_clipl_1024_336_13b",
        "piip-llava_convnext-l_clip-l_1024-336_13B",
        "PIIP-LLaVA_ConvNeXt-L_CLIP-L_1024-336_13B",
        (66.5, 36.8, 69.2, 69.8, 65.2, 82.5, 70.5, 87.6, 68.5),
    ),
)
BY_EXPERIMENT = {r.experiment: r for r in RELEASED + RELEASED_LLAVA}


def for_experiment(name: str | None) -> Released | None:
    return BY_EXPERIMENT.get(name or "")
