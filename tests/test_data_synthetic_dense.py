"""COCO and ADE20K layouts written from multi-object synthetic scenes (piip.data.synthetic)."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from piip.data.synthetic import ade20k as synthetic_ade20k
from piip.data.synthetic import coco as synthetic_coco
from piip.data.synthetic.ade20k import ADE20K_DIR, ade20k_scene, ensure_ade20k_layout, write_ade20k_layout
from piip.data.synthetic.coco import coco_scene, ensure_coco_layout, write_coco_layout
from piip.data.synthetic.publish import MANIFEST_NAME
from piip.data.synthetic.render import render_instance_masks, render_semantic
from piip.data.synthetic.scene import SHAPE_CLASSES, Scene
from tests.test_data_synthetic import crash_render_after

COCO_ARGS = {
    "train_images": 6,
    "val_images": 3,
    "image_size": 64,
    "seed": 0,
    "crowd_every": 3,
    "empty_every": 3,
}
ADE_ARGS = {"train_images": 6, "val_images": 3, "image_size": 64, "seed": 0}
SPLIT_DIRS = {"train": "train2017", "val": "val2017"}


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_coco_layout(tmp_path_factory.mktemp("coco") / "coco", **COCO_ARGS)


@pytest.fixture(scope="module")
def ade_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_ade20k_layout(tmp_path_factory.mktemp("ade") / "ade", **ADE_ARGS)


def load(root: Path, split: str) -> COCO:
    return COCO(str(root / "annotations" / f"instances_{SPLIT_DIRS[split]}.json"))


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def encoding(segmentation: object) -> str:
    if isinstance(segmentation, list):
        return "polygon"
    assert isinstance(segmentation, dict)
    return "rle" if isinstance(segmentation["counts"], str) else "uncompressed_rle"


@pytest.mark.parametrize("split", ["train", "val"])
def test_coco_images_and_categories(coco_root: Path, split: str) -> None:
    coco = load(coco_root, split)
    count = COCO_ARGS[f"{split}_images"]
    assert len(coco.getImgIds()) == count
    for info in coco.loadImgs(coco.getImgIds()):
        with Image.open(coco_root / SPLIT_DIRS[split] / info["file_name"]) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            assert image.size == (info["width"], info["height"]) == (64, 64)
    assert len(list((coco_root / SPLIT_DIRS[split]).iterdir())) == count
    categories = coco.loadCats(coco.getCatIds())
    ids = [c["id"] for c in categories]
    assert [c["name"] for c in categories] == list(SHAPE_CLASSES)
    assert ids != list(range(1, len(ids) + 1)) and len(set(ids)) == len(ids)


@pytest.mark.parametrize("split", ["train", "val"])
def test_coco_masks_boxes_and_areas_are_exact(coco_root: Path, split: str) -> None:
    coco = load(coco_root, split)
    names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    for image_id in coco.getImgIds():
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=None))
        scene = coco_scene(0, split, image_id - 1, 64, empty_every=3)
        expected = [
            (i.class_name, m)
            for i, m in zip(scene.instances, render_instance_masks(scene), strict=True)
            if m.sum() >= 4
        ]
        assert len(annotations) == len(expected)
        union = np.zeros((64, 64), dtype=int)
        for annotation, (name, visible) in zip(annotations, expected, strict=True):
            mask = coco.annToMask(annotation).astype(bool)
            assert names[annotation["category_id"]] == name
            assert np.array_equal(mask, visible), "every encoding used is exact"
            assert annotation["area"] == mask.sum()
            x, y, w, h = annotation["bbox"]
            ys, xs = np.nonzero(mask)
            assert (x, y, x + w, y + h) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            union += mask
        assert union.max() <= 1, "masks of one image are disjoint"


def test_coco_crowds_empties_and_encodings(coco_root: Path) -> None:
    for split in ("train", "val"):
        coco = load(coco_root, split)
        annotations = coco.dataset["annotations"]
        assert [a["id"] for a in annotations] == list(range(1, len(annotations) + 1))
        for a in annotations:
            assert a["iscrowd"] == int(a["id"] % 3 == 0)
            assert (encoding(a["segmentation"]) == "rle") == bool(a["iscrowd"])
        annotated = {a["image_id"] for a in annotations}
        for image_id in coco.getImgIds():
            assert (image_id in annotated) == (image_id % 3 != 0), "every third image is empty"
    train = load(coco_root, "train").dataset["annotations"]
    assert {"polygon", "rle"} <= {encoding(a["segmentation"]) for a in train}


def test_coco_is_deterministic_and_seeded(coco_root: Path, tmp_path: Path) -> None:
    first = tree_bytes(coco_root)
    assert first == tree_bytes(write_coco_layout(tmp_path / "again", **COCO_ARGS))
    other = tree_bytes(write_coco_layout(tmp_path / "other", **{**COCO_ARGS, "seed": 1}))
    assert first.keys() == other.keys()
    assert all(first[k] != other[k] for k in first if k.endswith(".jpg"))


def test_coco_manifest_reuse_and_mismatch(coco_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = json.loads((coco_root / MANIFEST_NAME).read_text())
    assert manifest["format"] == "coco" and manifest["args"] == COCO_ARGS
    assert manifest["classes"] == list(SHAPE_CLASSES)

    def no_render(scene: Scene) -> Image.Image:
        raise AssertionError("a matching directory must be reused without rendering")

    monkeypatch.setattr(synthetic_coco, "render_image", no_render)
    assert ensure_coco_layout(coco_root, **COCO_ARGS) == coco_root
    with pytest.raises(ValueError, match=r"crowd_every: existing 3, requested 5") as error:
        ensure_coco_layout(coco_root, **{**COCO_ARGS, "crowd_every": 5})
    assert str(coco_root) in str(error.value)
    with pytest.raises(ValueError, match="format: existing 'coco', requested 'ade20k'"):
        ensure_ade20k_layout(coco_root, **ADE_ARGS)


def test_ensure_detects_a_missing_coco_image(tmp_path: Path) -> None:
    root = ensure_coco_layout(tmp_path / "coco", **COCO_ARGS)
    next((root / "val2017").iterdir()).unlink()
    with pytest.raises(ValueError, match="incomplete"):
        ensure_coco_layout(root, **COCO_ARGS)


@pytest.mark.parametrize(
    ("ensure", "args", "writer"),
    [(ensure_coco_layout, COCO_ARGS, synthetic_coco), (ensure_ade20k_layout, ADE_ARGS, synthetic_ade20k)],
    ids=["coco", "ade"],
)
def test_interrupted_generation_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ensure: object, args: dict[str, int], writer: ModuleType
) -> None:
    real_render = writer.render_image
    crash_render_after(monkeypatch, 7, writer)
    root = tmp_path / "data"
    with pytest.raises(RuntimeError, match="simulated crash"):
        ensure(root, **args)  # type: ignore[operator]
    assert list(tmp_path.iterdir()) == [], "neither root nor a temp dir may remain"
    monkeypatch.setattr(writer, "render_image", real_render)
    assert ensure(root, **args) == root  # type: ignore[operator]
    assert list(tmp_path.iterdir()) == [root]


@pytest.mark.parametrize(
    ("split", "folder", "prefix"), [("train", "training", "ADE_train_"), ("val", "validation", "ADE_val_")]
)
def test_ade20k_pairs_and_label_maps(ade_root: Path, split: str, folder: str, prefix: str) -> None:
    base = ade_root / ADE20K_DIR
    count = ADE_ARGS[f"{split}_images"]
    stems = [f"{prefix}{i:08d}" for i in range(1, count + 1)]
    assert sorted(p.name for p in (base / "images" / folder).iterdir()) == [f"{s}.jpg" for s in stems]
    assert sorted(p.name for p in (base / "annotations" / folder).iterdir()) == [f"{s}.png" for s in stems]
    seen: set[int] = set()
    for index, stem in enumerate(stems):
        with (
            Image.open(base / "images" / folder / f"{stem}.jpg") as image,
            Image.open(base / "annotations" / folder / f"{stem}.png") as label,
        ):
            assert image.mode == "RGB" and label.mode == "L" and image.size == label.size == (64, 64)
            labels = np.asarray(label)
        assert labels.dtype == np.uint8 and labels.max() <= len(SHAPE_CLASSES)
        assert np.array_equal(labels, render_semantic(ade20k_scene(0, split, index, 64)))
        seen |= set(np.unique(labels).tolist())
    assert 0 in seen and len(seen) > 2


def test_ade20k_determinism_manifest_and_mismatch(ade_root: Path, tmp_path: Path) -> None:
    first = tree_bytes(ade_root)
    assert first == tree_bytes(write_ade20k_layout(tmp_path / "again", **ADE_ARGS))
    other = tree_bytes(write_ade20k_layout(tmp_path / "other", **{**ADE_ARGS, "seed": 1}))
    assert all(first[k] != other[k] for k in first if k.endswith(".jpg"))
    manifest = json.loads((ade_root / MANIFEST_NAME).read_text())
    assert manifest["format"] == "ade20k" and manifest["args"] == ADE_ARGS
    assert manifest["labels"] == ["other", *SHAPE_CLASSES]
    assert ensure_ade20k_layout(ade_root, **ADE_ARGS) == ade_root
    with pytest.raises(ValueError, match=r"image_size: existing 64, requested 32"):
        ensure_ade20k_layout(ade_root, **{**ADE_ARGS, "image_size": 32})


def test_write_refuses_non_empty_root_and_bad_args(coco_root: Path, tmp_path: Path) -> None:
    with pytest.raises(FileExistsError):
        write_coco_layout(coco_root, **COCO_ARGS)
    with pytest.raises(ValueError, match="empty_every"):
        write_coco_layout(tmp_path / "x", **{**COCO_ARGS, "empty_every": -1})
    with pytest.raises(ValueError, match="val_images"):
        write_ade20k_layout(tmp_path / "y", **{**ADE_ARGS, "val_images": 0})
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
