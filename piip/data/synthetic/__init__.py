"""The embedded "shapes" data: a seeded scene model rendered to images and written in the on-disk formats
piip reads (ImageNet folders, COCO, ADE20K, LLaVA JSON with a tiny language model), so the quick start and
the tests run the real loading code without a download."""

from piip.data.synthetic.llava import ensure_llava_layout, write_llava_layout
from piip.data.synthetic.shapes import (
    COCO_CATEGORY_IDS,
    MANIFEST_NAME,
    SHAPE_CLASSES,
    ensure_ade20k_layout,
    ensure_coco_layout,
    ensure_imagenet_layout,
    render_image,
    render_instance_masks,
    write_coco_layout,
)

__all__ = [
    "COCO_CATEGORY_IDS",
    "MANIFEST_NAME",
    "SHAPE_CLASSES",
    "ensure_ade20k_layout",
    "ensure_coco_layout",
    "ensure_imagenet_layout",
    "ensure_llava_layout",
    "render_image",
    "render_instance_masks",
    "write_coco_layout",
    "write_llava_layout",
]
