"""The embedded "shapes" data: a seeded scene model rendered to images and written in the on-disk formats
piip reads (ImageNet folders, COCO, ADE20K, LLaVA JSON with a tiny language model), so the quick start and
the tests run the real loading code without a download.

Modules, one job each: `scene` (the scene model), `sampling` (seeded scenes), `render` (images, masks,
semantic maps, boxes), `publish` (atomic publish, manifest checks and reuse), one writer per format
(`imagenet`, `coco`, `ade20k` with `dense_layouts`, `llava` with `llava_scenes` and `llava_questions`) and
`language_model` (the tiny tokenizer and Llama of the LLaVA layout)."""

from piip.data.synthetic.ade20k import ensure_ade20k_layout
from piip.data.synthetic.coco import COCO_CATEGORY_IDS, ensure_coco_layout, write_coco_layout
from piip.data.synthetic.imagenet import ensure_imagenet_layout
from piip.data.synthetic.llava import ensure_llava_layout, write_llava_layout
from piip.data.synthetic.publish import MANIFEST_NAME
from piip.data.synthetic.render import render_image, render_instance_masks
from piip.data.synthetic.scene import SHAPE_CLASSES

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
