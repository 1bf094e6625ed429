"""Tests for the embedded shapes generator: scene rendering consistency and the ImageNet folder writer.

Datasets here are tiny (8 classes x a few images of 32px) so the whole file runs in a few seconds.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import threading
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from PIL import Image

from piip.data.synthetic import imagenet as synthetic_imagenet
from piip.data.synthetic.imagenet import ensure_imagenet_layout, imagenet_scene, write_imagenet_layout
from piip.data.synthetic.publish import MANIFEST_NAME
from piip.data.synthetic.render import instance_boxes, render_image, render_instance_masks, render_semantic
from piip.data.synthetic.sampling import sample_scene
from piip.data.synthetic.scene import GENERATOR_VERSION, SHAPE_CLASSES, Background, Scene, ShapeInstance

SMALL = dict(train_per_class=3, val_per_class=2, image_size=32, seed=0)


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under `root` by relative path, for byte-level comparisons."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def scenes(dominant: bool, count: int, size: int = 64) -> list[Scene]:
    """`count` sampled scenes, one Generator seed each; dominant ones cycle through the subject classes."""
    return [
        sample_scene(
            np.random.default_rng(i), size, size, dominant=dominant, subject_class=i % 8 if dominant else None
        )
        for i in range(count)
    ]


# ----------------------------------------------------------------------------------------- scene model


def test_shape_classes_are_sorted_so_image_folder_indices_match() -> None:
    assert len(SHAPE_CLASSES) == 8
    assert list(SHAPE_CLASSES) == sorted(set(SHAPE_CLASSES))


def test_sample_scene_is_a_pure_function_of_the_generator() -> None:
    a = sample_scene(np.random.default_rng(7), 64, 48, dominant=False)
    b = sample_scene(np.random.default_rng(7), 64, 48, dominant=False)
    c = sample_scene(np.random.default_rng(8), 64, 48, dominant=False)
    assert a == b and a != c
    assert (a.width, a.height) == (64, 48)
    assert np.array_equal(np.asarray(render_image(a)), np.asarray(render_image(b)))


def test_sampled_scenes_vary_backgrounds_and_counts() -> None:
    multi = scenes(dominant=False, count=60)
    assert {s.background.kind for s in multi} == {"flat", "gradient", "noise"}
    assert len({len(s.instances) for s in multi}) >= 4
    assert {len(s.instances) for s in scenes(dominant=True, count=60)} == {1, 2, 3}


@pytest.mark.parametrize("dominant", [True, False])
def test_masks_semantic_and_boxes_agree(dominant: bool) -> None:
    for scene in scenes(dominant, count=40):
        masks = render_instance_masks(scene)
        assert len(masks) == len(scene.instances)
        stacked = np.stack(masks)
        assert stacked.dtype == bool and stacked.shape[1:] == (scene.height, scene.width)
        assert stacked.sum(axis=0).max() <= 1, "visible masks must be disjoint"
        assert all(m.any() for m in masks), "sampled instances are never fully hidden"

        semantic = render_semantic(scene)
        assert semantic.dtype == np.uint8 and semantic.shape == (scene.height, scene.width)
        assert np.array_equal(semantic > 0, stacked.any(axis=0))
        for instance, mask in zip(scene.instances, masks, strict=True):
            assert np.all(semantic[mask] == instance.class_index + 1)

        boxes = instance_boxes(masks)
        assert boxes.shape == (len(masks), 4)
        for (x0, y0, x1, y1), mask in zip(boxes, masks, strict=True):
            ys, xs = np.nonzero(mask)
            # Tight: the box is exactly the extent of the mask, in exclusive pixel-edge coordinates.
            assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            inside = np.zeros_like(mask)
            inside[y0:y1, x0:x1] = True
            assert not (mask & ~inside).any()


def test_multi_object_scenes_keep_instances_visible() -> None:
    for scene in scenes(dominant=False, count=40):
        assert scene.subject_index is None and scene.label is None
        for instance, mask in zip(scene.instances, render_instance_masks(scene), strict=True):
            alone = render_instance_masks(dataclasses.replace(scene, instances=(instance,)))[0]
            assert mask.sum() >= 0.3 * alone.sum()


def test_dominant_subject_is_largest_and_mostly_visible() -> None:
    for scene in scenes(dominant=True, count=120, size=80):
        subject = scene.instances[scene.subject_index]
        assert scene.label == subject.class_index
        masks = render_instance_masks(scene)
        areas = [int(m.sum()) for m in masks]
        subject_area = areas.pop(scene.subject_index)
        assert all(subject_area > 1.4 * a for a in areas)
        alone = render_instance_masks(dataclasses.replace(scene, instances=(subject,), subject_index=0))[0]
        assert subject_area >= 0.7 * alone.sum()
        x0, y0, x1, y1 = instance_boxes([alone])[0]
        assert max(x1 - x0, y1 - y0) >= 0.35 * 80, "the subject is large"
        others = [i.class_index for k, i in enumerate(scene.instances) if k != scene.subject_index]
        assert subject.class_index not in others


def test_shapes_stand_out_from_the_background() -> None:
    for scene in scenes(dominant=True, count=60):
        image = np.asarray(render_image(scene), dtype=float)
        background = np.asarray(render_image(dataclasses.replace(scene, instances=())), dtype=float)
        mask = render_instance_masks(scene)[scene.subject_index]
        distance = np.linalg.norm(image[mask] - background[mask], axis=-1)
        assert np.median(distance) >= 90
        luma = np.array([0.299, 0.587, 0.114])
        assert np.median(np.abs((image[mask] - background[mask]) @ luma)) >= 40, "brightness differs too"


def test_paint_order_decides_occlusion() -> None:
    background = Background("flat", (0, 0, 0))
    below = ShapeInstance(5, (12.0, 16.0), 20.0, 0.0, (255, 0, 0))  # square
    above = ShapeInstance(0, (20.0, 16.0), 20.0, 0.0, (0, 0, 255))  # circle
    scene = Scene(32, 32, background, (below, above))
    low_mask, top_mask = render_instance_masks(scene)
    alone = render_instance_masks(Scene(32, 32, background, (above,)))[0]
    assert np.array_equal(top_mask, alone)
    assert not low_mask[16, 16] and top_mask[16, 16]
    assert render_semantic(scene)[16, 16] == 1
    assert render_image(scene).getpixel((16, 16)) == (0, 0, 255)
    assert render_image(scene).getpixel((5, 16)) == (255, 0, 0)


def test_ring_has_a_hole_showing_the_background() -> None:
    ring = ShapeInstance(SHAPE_CLASSES.index("ring"), (16.0, 16.0), 28.0, 0.0, (250, 250, 250))
    scene = Scene(32, 32, Background("flat", (10, 20, 30)), (ring,))
    mask = render_instance_masks(scene)[0]
    assert not mask[16, 16] and mask[16, 3]
    assert render_semantic(scene)[16, 16] == 0
    assert render_image(scene).getpixel((16, 16)) == (10, 20, 30)


def test_instance_boxes_reject_empty_masks() -> None:
    with pytest.raises(ValueError, match="instance 1"):
        instance_boxes([np.ones((4, 4), bool), np.zeros((4, 4), bool)])


def test_sample_scene_rejects_bad_arguments() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="subject_class"):
        sample_scene(rng, 32, 32, dominant=True, subject_class=8)
    with pytest.raises(ValueError, match="dominant"):
        sample_scene(rng, 32, 32, dominant=False, subject_class=1)


# ---------------------------------------------------------------------------------- ImageNet writer


def test_layout_counts_and_images(tmp_path: Path) -> None:
    root = write_imagenet_layout(tmp_path / "shapes", **SMALL)
    assert sorted(p.name for p in root.iterdir()) == [MANIFEST_NAME, "train", "val"]
    for split, per_class in (("train", 3), ("val", 2)):
        assert sorted(p.name for p in (root / split).iterdir()) == list(SHAPE_CLASSES)
        for name in SHAPE_CLASSES:
            files = sorted(p.name for p in (root / split / name).iterdir())
            assert files == [f"{name}_{i:05d}.JPEG" for i in range(per_class)]
            for file in files:
                with Image.open(root / split / name / file) as image:
                    assert image.format == "JPEG" and image.mode == "RGB" and image.size == (32, 32)


def test_writes_are_deterministic_and_seeded(tmp_path: Path) -> None:
    first = tree_bytes(write_imagenet_layout(tmp_path / "a", **SMALL))
    second = tree_bytes(write_imagenet_layout(tmp_path / "b", **SMALL))
    assert first == second
    other = tree_bytes(write_imagenet_layout(tmp_path / "c", **{**SMALL, "seed": 1}))
    assert first.keys() == other.keys()
    images = [k for k in first if k.endswith(".JPEG")]
    assert all(first[k] != other[k] for k in images)


def test_train_and_val_scenes_differ(tmp_path: Path) -> None:
    root = write_imagenet_layout(tmp_path / "shapes", **SMALL)
    for name in SHAPE_CLASSES:
        for i in range(2):
            train = (root / "train" / name / f"{name}_{i:05d}.JPEG").read_bytes()
            val = (root / "val" / name / f"{name}_{i:05d}.JPEG").read_bytes()
            assert train != val


def test_any_image_regenerates_from_its_own_scene(tmp_path: Path) -> None:
    root = write_imagenet_layout(tmp_path / "shapes", **{**SMALL, "image_format": "PNG"})
    path = root / "val" / "star" / "star_00001.png"
    scene = imagenet_scene(0, "val", SHAPE_CLASSES.index("star"), 1, 32)
    assert scene.label == SHAPE_CLASSES.index("star")
    with Image.open(path) as image:
        assert np.array_equal(np.asarray(image), np.asarray(render_image(scene)))


def test_manifest_contents(tmp_path: Path) -> None:
    root = write_imagenet_layout(tmp_path / "shapes", **SMALL)
    manifest = json.loads((root / MANIFEST_NAME).read_text())
    assert manifest["version"] == GENERATOR_VERSION
    assert manifest["format"] == "imagenet"
    assert manifest["classes"] == list(SHAPE_CLASSES)
    assert manifest["args"] == {**SMALL, "image_format": "JPEG"}
    assert manifest["counts"] == {"train": 24, "val": 16}


def test_image_folder_reads_the_layout(tmp_path: Path) -> None:
    from torchvision.datasets import ImageFolder

    root = write_imagenet_layout(tmp_path / "shapes", **SMALL)
    train = ImageFolder(str(root / "train"))
    assert train.class_to_idx == {name: i for i, name in enumerate(SHAPE_CLASSES)}
    assert np.bincount(train.targets).tolist() == [3] * 8
    for path, target in train.samples:
        assert Path(path).parent.name == SHAPE_CLASSES[target]
    image, target = ImageFolder(str(root / "val"))[5]
    assert image.size == (32, 32) and target == 2


def test_generation_logs_one_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger=synthetic_imagenet.__name__):
        root = write_imagenet_layout(tmp_path / "shapes", **SMALL)
    lines = [r.getMessage() for r in caplog.records if r.name == synthetic_imagenet.__name__]
    assert len(lines) == 1
    assert str(root) in lines[0] and "24 train + 16 val" in lines[0] and " s" in lines[0]


def crash_render_after(monkeypatch: pytest.MonkeyPatch, images: int, writer: ModuleType) -> list[int]:
    """Make rendering in the format module `writer` fail after `images` images (patched where `writer`
    looks `render_image` up); returns a one-item list counting the render calls."""
    real_render = writer.render_image
    calls = [0]

    def failing_render(scene: Scene) -> Image.Image:
        calls[0] += 1
        if calls[0] > images:
            raise RuntimeError("simulated crash")
        return real_render(scene)

    monkeypatch.setattr(writer, "render_image", failing_render)
    return calls


def test_interrupted_generation_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_render = synthetic_imagenet.render_image
    calls = crash_render_after(monkeypatch, 10, synthetic_imagenet)
    root = tmp_path / "shapes"
    with pytest.raises(RuntimeError, match="simulated crash"):
        ensure_imagenet_layout(root, **SMALL)
    assert calls == [11]
    assert list(tmp_path.iterdir()) == [], "neither root nor a temp dir may remain"

    monkeypatch.setattr(synthetic_imagenet, "render_image", real_render)
    assert ensure_imagenet_layout(root, **SMALL) == root
    assert list(tmp_path.iterdir()) == [root]


def test_ensure_generates_then_reuses_without_rendering(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "shapes"
    assert ensure_imagenet_layout(str(root), **SMALL) == root
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}

    def no_render(scene: Scene) -> Image.Image:
        raise AssertionError("reuse must not render")

    monkeypatch.setattr(synthetic_imagenet, "render_image", no_render)
    assert ensure_imagenet_layout(root, **SMALL) == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before
    assert list(tmp_path.iterdir()) == [root]


def test_ensure_fills_an_existing_empty_directory(tmp_path: Path) -> None:
    root = tmp_path / "shapes"
    root.mkdir()
    ensure_imagenet_layout(root, **SMALL)
    assert (root / MANIFEST_NAME).is_file()
    assert list(tmp_path.iterdir()) == [root]


@pytest.mark.parametrize(("field", "value"), [("image_size", 48), ("seed", 3), ("val_per_class", 1)])
def test_ensure_rejects_data_from_other_arguments(tmp_path: Path, field: str, value: int) -> None:
    root = ensure_imagenet_layout(tmp_path / "shapes", **SMALL)
    before = tree_bytes(root)
    with pytest.raises(ValueError, match="different settings") as error:
        ensure_imagenet_layout(root, **{**SMALL, field: value})
    message = str(error.value)
    assert str(root) in message and field in message and "data_dir" in message
    assert f"existing {SMALL[field]!r}, requested {value!r}" in message
    assert tree_bytes(root) == before


def test_ensure_rejects_data_from_another_generator_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = ensure_imagenet_layout(tmp_path / "shapes", **SMALL)
    monkeypatch.setattr(synthetic_imagenet, "GENERATOR_VERSION", GENERATOR_VERSION + 1)
    with pytest.raises(ValueError, match="version"):
        ensure_imagenet_layout(root, **SMALL)


def test_ensure_refuses_a_foreign_directory(tmp_path: Path) -> None:
    root = tmp_path / "mine"
    root.mkdir()
    (root / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not generated by piip") as error:
        ensure_imagenet_layout(root, **SMALL)
    assert str(root) in str(error.value)
    assert [p.name for p in root.iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_ensure_detects_missing_images(tmp_path: Path) -> None:
    root = ensure_imagenet_layout(tmp_path / "shapes", **SMALL)
    (root / "train" / "ring" / "ring_00001.JPEG").unlink()
    with pytest.raises(ValueError, match="incomplete") as error:
        ensure_imagenet_layout(root, **SMALL)
    assert "ring" in str(error.value)


def test_write_refuses_a_non_empty_root(tmp_path: Path) -> None:
    root = write_imagenet_layout(tmp_path / "shapes", **SMALL)
    with pytest.raises(FileExistsError, match="shapes"):
        write_imagenet_layout(root, **SMALL)


@pytest.mark.parametrize(
    ("field", "value"),
    [("train_per_class", 0), ("val_per_class", -1), ("image_size", 8), ("seed", -1), ("image_format", "GIF")],
)
def test_invalid_arguments_are_rejected(tmp_path: Path, field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        ensure_imagenet_layout(tmp_path / "shapes", **{**SMALL, field: value})
    assert list(tmp_path.iterdir()) == []


def publish_while_generating(monkeypatch: pytest.MonkeyPatch, reference: Path, root: Path) -> None:
    """Simulate another rank: `reference` appears at `root` while this process renders its images."""
    real_render = synthetic_imagenet.render_image

    def render_while_other_rank_finishes(scene: Scene) -> Image.Image:
        if not root.exists():
            shutil.copytree(reference, root)
        return real_render(scene)

    monkeypatch.setattr(synthetic_imagenet, "render_image", render_while_other_rank_finishes)


def test_concurrent_writer_that_wins_the_rename_is_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another rank publishes `root` while this one generates: this one discards its own copy."""
    reference = write_imagenet_layout(tmp_path / "reference", **SMALL)
    root = tmp_path / "shapes"
    publish_while_generating(monkeypatch, reference, root)
    assert ensure_imagenet_layout(root, **SMALL) == root
    assert tree_bytes(root) == tree_bytes(reference)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reference", "shapes"]


def test_concurrent_writer_with_other_arguments_is_not_overwritten(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = write_imagenet_layout(tmp_path / "reference", **{**SMALL, "seed": 5})
    root = tmp_path / "shapes"
    publish_while_generating(monkeypatch, reference, root)
    with pytest.raises(ValueError, match="seed"):
        ensure_imagenet_layout(root, **SMALL)
    assert tree_bytes(root) == tree_bytes(reference)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reference", "shapes"]


def test_parallel_ensure_calls_agree(tmp_path: Path) -> None:
    root = tmp_path / "shapes"
    results: list[Path] = []
    errors: list[BaseException] = []

    def call() -> None:
        try:
            results.append(ensure_imagenet_layout(root, **SMALL))
        except BaseException as error:  # noqa: BLE001 - reported by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=call) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and results == [root] * 3
    assert list(tmp_path.iterdir()) == [root]
    reference = write_imagenet_layout(tmp_path / "reference", **SMALL)
    assert tree_bytes(root) == tree_bytes(reference)
