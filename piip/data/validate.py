"""Set-up checks of a COCO instances split, so bad data fails before training with the file and record named,
not as a pycocotools or torch traceback at the end of the first epoch, nor as silently wrong metrics.

Checked: the file is a UTF-8 JSON object with `images`, `annotations` and `categories` lists; every record
has the fields and types the loaders and COCOeval read (integer ids, `bbox` of 4 finite numbers with
w, h >= 0, polygons of at least 3 points, RLE with `size` and `counts`), ids are unique and every reference
is known; a segmentation is present where masks are trained or evaluated; and every listed image exists,
opens and has the size the file records (read from its header; pixels are never decoded). All problems of
a file are collected into one error that spells out the first few. An empty split is an error: it would
train on nothing, or score 0.0 without a word.

Repeating the checks is cheap: the outcome is cached in a small JSON beside the annotation file (or under a
`cache_dir`), keyed by the (path, size, mtime) of the annotation file and of each image, so a second set-up
re-checks only what changed and opens no unchanged image.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from piip.data.files import write_json
from piip.errors import DataError
from piip.models.checks import is_int, is_number

log = logging.getLogger(__name__)

CACHE_VERSION = 1
SECTIONS = ("images", "annotations", "categories")
SHOWN_PROBLEMS = 3  # besides the first, in one error message


@dataclass(frozen=True)
class SplitNeeds:
    """What a split is used for, which decides the fields it must have."""

    train: bool  # crowd regions are dropped; otherwise COCOeval reads every annotation, `area` and `iscrowd`
    masks: bool  # masks are trained and evaluated: every annotation used needs a segmentation


@dataclass
class SplitReport:
    """Counts of a checked split, for the log."""

    images: int
    annotations: int
    used: int  # trained on / scored
    without_annotations: int  # images
    crowd: int
    degenerate: int  # boxes under one pixel once clipped to the image: skipped by the loader
    boxes_only: int  # used annotations without segmentation (the box is the mask)

    def describe(self, train: bool) -> str:
        crowd = "dropped in training" if train else "ignore regions in evaluation"
        parts = [f"{self.used} used"]
        if self.crowd:
            parts.append(f"{self.crowd} crowd ({crowd})")
        if self.degenerate:
            parts.append(f"{self.degenerate} skipped (box under 1 pixel once clipped to its image)")
        if self.boxes_only:
            parts.append(f"{self.boxes_only} boxes only (the box is the mask)")
        return (
            f"{self.images} images ({self.without_annotations} without annotations), "
            f"{self.annotations} annotations: {', '.join(parts)}"
        )


class Problems:
    """Problems found in one file, raised together as one `DataError` naming it."""

    def __init__(self, file: Path) -> None:
        self.file = file
        self.found: list[str] = []

    def add(self, problem: str) -> None:
        self.found.append(problem)

    def raise_if_any(self) -> None:
        if not self.found:
            return
        first, rest = self.found[0], self.found[1:]
        more = ""
        if rest:
            shown = "; ".join(rest[:SHOWN_PROBLEMS]) + ("; ..." if len(rest) > SHOWN_PROBLEMS else "")
            more = f" (and {len(rest)} more: {shown})"
        raise DataError(f"{self.file}: {first}{more}")


# -- reading ----------------------------------------------------------------------------------------------
def read_json(path: Path, what: str) -> Any:
    """A UTF-8 JSON file (a leading byte-order mark is allowed); errors name the file and, for bytes that are
    not UTF-8, their offset."""
    if not path.is_file():
        raise DataError(f"{what} not found: {path}")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as err:
        bad = data[err.start : err.start + 4]
        raise DataError(
            f"{path} is not UTF-8 text: byte offset {err.start} holds {bad!r}; expected JSON encoded as "
            "UTF-8 (re-save the file as UTF-8)"
        ) from err
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is not JSON: {err}") from err


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the image header; the pixels are not decoded."""
    with Image.open(path) as image:
        return image.size


# -- the annotation file ----------------------------------------------------------------------------------
def usable_box(bbox: list[float], width: int, height: int) -> list[float] | None:
    """The xyxy box clipped to the image, or None when under one pixel wide or high: zero, negative and
    out-of-image boxes are skipped, as the reference toolkits do."""
    x, y, w, h = bbox
    x1, y1, x2, y2 = max(x, 0.0), max(y, 0.0), min(x + w, width), min(y + h, height)
    return None if x2 - x1 < 1 or y2 - y1 < 1 else [x1, y1, x2, y2]


def check_instances(dataset: Any, file: Path, needs: SplitNeeds) -> SplitReport:
    """Every record's fields and references (the images themselves: `check_image_files`)."""
    check_sections(dataset, file)
    if not dataset["images"]:
        raise DataError(
            f"{file} lists no images; expected at least one (an empty split trains or scores nothing)"
        )
    if not dataset["annotations"]:
        raise DataError(
            f"{file} has no annotations; expected at least one (training would learn nothing and every "
            "validation score would be 0)"
        )
    problems = Problems(file)
    categories = _check_categories(dataset["categories"], problems)
    images = _check_images(dataset["images"], problems)
    problems.raise_if_any()
    report = _check_annotations(dataset["annotations"], images, categories, needs, problems)
    problems.raise_if_any()
    if not report.used:
        raise DataError(
            f"{file}: none of its {report.annotations} annotations can be used ({report.crowd} crowd, "
            f"{report.degenerate} boxes under 1 pixel); expected at least one"
        )
    return report


def check_sections(dataset: Any, file: Path) -> None:
    """A JSON object with `images`, `annotations` and `categories` lists: what pycocotools indexes."""
    if not isinstance(dataset, dict):
        raise DataError(
            f"{file} is not a COCO instances file: expected a JSON object with {list(SECTIONS)}, got a JSON "
            f"{type(dataset).__name__}"
        )
    missing = [key for key in SECTIONS if key not in dataset]
    if missing:
        raise DataError(f"{file} is not a COCO instances file: missing {missing}")
    not_lists = [key for key in SECTIONS if not isinstance(dataset[key], list)]
    if not_lists:
        raise DataError(f"{file} is not a COCO instances file: {not_lists} must be lists")


def _check_categories(categories: list[Any], problems: Problems) -> set[int]:
    known: set[int] = set()
    for i, category in enumerate(categories):
        if not isinstance(category, dict) or not is_int(category.get("id")):
            problems.add(f"categories[{i}]: expected an object with an integer 'id', got {category!r}")
        elif category["id"] in known:
            problems.add(f"category id {category['id']} is listed twice")
        elif not isinstance(category.get("name"), str):
            problems.add(f"category {category['id']}: expected a string 'name', got {category.get('name')!r}")
        else:
            known.add(category["id"])
    return known


def _check_images(images: list[Any], problems: Problems) -> dict[int, tuple[int, int]]:
    """Image id -> (width, height) as recorded."""
    sizes: dict[int, tuple[int, int]] = {}
    for i, image in enumerate(images):
        if not isinstance(image, dict) or not is_int(image.get("id")):
            problems.add(f"images[{i}]: expected an object with an integer 'id', got {_short(image)}")
            continue
        where = f"image {image['id']}"
        if image["id"] in sizes:
            problems.add(f"{where} is listed twice")
        name = image.get("file_name")
        if not isinstance(name, str) or not name:
            problems.add(f"{where}: expected a 'file_name' string, got {name!r}")
        width, height = image.get("width"), image.get("height")
        if not (is_int(width) and is_int(height) and width > 0 and height > 0):
            problems.add(
                f"{where}: expected positive integer 'width' and 'height', got {width!r} x {height!r}"
            )
            continue
        sizes[image["id"]] = (width, height)
    return sizes


def _check_annotations(
    annotations: list[Any],
    images: dict[int, tuple[int, int]],
    categories: set[int],
    needs: SplitNeeds,
    problems: Problems,
) -> SplitReport:
    seen: set[int] = set()
    annotated: set[int] = set()
    unknown_categories: dict[Any, Any] = {}  # category id -> first annotation using it
    used = crowd = degenerate = boxes_only = 0
    for i, ann in enumerate(annotations):
        if not isinstance(ann, dict):
            problems.add(f"annotations[{i}]: expected an object, got {_short(ann)}")
            continue
        where = f"annotation {ann['id']}" if is_int(ann.get("id")) else f"annotations[{i}]"
        if not is_int(ann.get("id")):
            problems.add(f"{where}: expected an integer 'id', got {ann.get('id')!r}")
        elif ann["id"] in seen:
            problems.add(f"annotation id {ann['id']} is used twice")
        else:
            seen.add(ann["id"])
        image_id = ann.get("image_id")
        if not is_int(image_id) or image_id not in images:
            problems.add(f"{where}: image_id {image_id!r} is not listed in 'images'")
            continue
        where += f" (image {image_id})"
        annotated.add(image_id)
        category = ann.get("category_id")
        if not is_int(category) or category not in categories:
            unknown_categories.setdefault(category if is_int(category) else repr(category), where)
        bbox = ann.get("bbox")
        if (
            not (isinstance(bbox, list) and len(bbox) == 4 and all(is_number(v) for v in bbox))
            or min(bbox[2:]) < 0
        ):
            problems.add(
                f"{where}: bbox {_short(bbox)}; expected [x, y, width, height], 4 finite numbers with "
                "width, height >= 0"
            )
            continue
        is_crowd = ann.get("iscrowd", 0)
        if ("iscrowd" not in ann and not needs.train) or is_crowd not in (0, 1):
            problems.add(
                f"{where}: expected 'iscrowd' 0 or 1 (COCOeval reads it), got {ann.get('iscrowd')!r}"
            )
        if not needs.train and not (is_number(ann.get("area")) and ann["area"] >= 0):
            problems.add(
                f"{where}: expected a number 'area' >= 0 (COCOeval reads it), got {ann.get('area')!r}"
            )
        width, height = images[image_id]
        skipped = bool(is_crowd) and needs.train
        crowd += bool(is_crowd)
        if not is_crowd and usable_box(bbox, width, height) is None:
            degenerate += 1
            skipped = True
        used += not (is_crowd or skipped)
        segmentation = ann.get("segmentation")
        if segmentation is None or segmentation == []:
            boxes_only += not (is_crowd or skipped)
            if needs.masks and not skipped:
                problems.add(
                    f"{where} has no segmentation (boxes only), but masks are trained and evaluated; add "
                    "polygons or RLE, or set task.module.evaluate_masks=false to train and evaluate boxes "
                    "only"
                )
            continue
        problem = segmentation_problem(segmentation, width, height)
        if problem:
            problems.add(f"{where}: {problem}")
    if unknown_categories:
        ids = sorted(unknown_categories, key=str)
        first = unknown_categories[ids[0]]
        problems.found.insert(
            0, f"annotations use category ids {ids} not listed in categories (first: {first})"
        )
    return SplitReport(
        images=len(images),
        annotations=len(annotations),
        used=used,
        without_annotations=len(images) - len(annotated),
        crowd=crowd,
        degenerate=degenerate,
        boxes_only=boxes_only,
    )


def segmentation_problem(segmentation: Any, width: int, height: int) -> str | None:
    """What is wrong with a non-empty segmentation that pycocotools would crash on or misread, or None."""
    if isinstance(segmentation, list):
        for k, polygon in enumerate(segmentation):
            # type() instead of is_number per value: polygons hold most of a file's numbers
            if not isinstance(polygon, list) or not all(type(v) in (int, float) for v in polygon):
                return f"segmentation polygon {k} must be a list of numbers, got {_short(polygon)}"
            if len(polygon) < 6 or len(polygon) % 2:
                return (
                    f"segmentation polygon {k} has {len(polygon)} numbers; expected x, y pairs of at least 3 "
                    "points (an even count >= 6)"
                )
            if not math.isfinite(sum(polygon)):
                return f"segmentation polygon {k} holds a non-finite number"
        return None
    if isinstance(segmentation, dict):
        size, counts = segmentation.get("size"), segmentation.get("counts")
        if size != [height, width]:
            return (
                f"segmentation RLE 'size' is {_short(size)}; expected [height, width] = [{height}, {width}] "
                "of its image"
            )
        if isinstance(counts, str):
            return None
        if isinstance(counts, list) and all(is_int(v) and v >= 0 for v in counts):
            if sum(counts) != height * width:
                total = sum(counts)
                return (
                    f"uncompressed RLE 'counts' add up to {total}; expected height x width = {height * width}"
                )
            return None
        expected = "a string or a list of non-negative integers"
        return f"segmentation RLE 'counts' must be {expected}, got {_short(counts)}"
    return (
        "segmentation must be polygons (a list of lists of numbers) or RLE (an object with 'size' and "
        f"'counts'), got {_short(segmentation)}"
    )


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- the image files --------------------------------------------------------------------------------------
def check_image_files(
    images: list[dict[str, Any]], image_dir: Path, headers: dict[str, list[int]], problems: Problems
) -> dict[str, list[int]]:
    """Every listed image exists, opens and has its recorded size; what is wrong goes to `problems`.

    `headers` (file name -> size, mtime_ns, width, height) spares opening files whose size and mtime are
    unchanged; the returned table holds every listed image that opened."""
    fresh: dict[str, list[int]] = {}
    for record in images:
        name, where = record["file_name"], f"image {record['id']}"
        path = image_dir / name
        try:
            stat = path.stat()
        except FileNotFoundError:
            problems.add(f"{where}: {path} does not exist")
            continue
        except OSError as err:
            problems.add(f"{where}: cannot read {path}: {err}")
            continue
        stamp = [stat.st_size, stat.st_mtime_ns]
        known = headers.get(name)
        if known is not None and known[:2] == stamp:
            width, height = known[2:]
        else:
            try:
                width, height = image_size(path)
            except (OSError, ValueError, Image.DecompressionBombError) as err:
                problems.add(f"{where}: {path} does not open as an image ({err})")
                continue
        fresh[name] = [*stamp, width, height]
        if (width, height) != (record["width"], record["height"]):
            problems.add(
                f"{where}: {path} is {width}x{height} (width x height) but the file records "
                f"{record['width']}x{record['height']}; boxes and masks would not match its pixels (correct "
                "'width'/'height' or the image)"
            )
    return fresh


# -- the split, cached ------------------------------------------------------------------------------------
def validate_split(
    annotation_file: Path, image_dir: Path, needs: SplitNeeds, cache_dir: Path | None = None
) -> tuple[dict[str, Any], SplitReport]:
    """The checked annotation file (parsed) and its counts; `DataError` naming the file and the record.

    The cache is written even when an image is wrong, so that after fixing it only that image is opened."""
    annotation_file, image_dir = Path(annotation_file), Path(image_dir)
    stamp = _stamp(annotation_file) if annotation_file.is_file() else None  # before reading: a later edit
    dataset = read_json(annotation_file, "COCO annotation file")  # changes the stamp, so it is checked again
    if not image_dir.is_dir():
        raise DataError(f"COCO image folder not found: {image_dir} (named by {annotation_file})")
    cache_file = cache_path(annotation_file, cache_dir)
    cache = _read_cache(cache_file, annotation_file, image_dir)
    same_file = cache.get("stamp") == stamp and cache.get("needs") == asdict(needs)
    report = _cached_report(cache) if same_file else None
    if report is None:
        report = check_instances(dataset, annotation_file, needs)
    headers = cache.get("headers") or {}
    problems = Problems(annotation_file)
    checked = check_image_files(dataset["images"], image_dir, headers, problems)
    if not same_file or checked != headers:
        record = {"stamp": stamp, "needs": asdict(needs), "report": asdict(report), "headers": checked}
        _write_cache(cache_file, annotation_file, image_dir, record)
    problems.raise_if_any()
    return dataset, report


def cache_path(annotation_file: Path, cache_dir: Path | None) -> Path:
    """Beside the annotation file, or in `cache_dir` under a name unique to the file's absolute path."""
    if cache_dir is None:
        return annotation_file.with_name(f".{annotation_file.name}.checked.json")
    digest = hashlib.sha1(str(annotation_file.resolve()).encode()).hexdigest()[:12]
    return Path(cache_dir) / f"{annotation_file.stem}-{digest}.checked.json"


def _stamp(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def _identity(annotation_file: Path, image_dir: Path) -> dict[str, Any]:
    """What a cache file is about: another version or other folders make it someone else's."""
    return {
        "version": CACHE_VERSION,
        "annotation_file": str(annotation_file.resolve()),
        "image_dir": str(image_dir.resolve()),
    }


def _read_cache(path: Path, annotation_file: Path, image_dir: Path) -> dict[str, Any]:
    """The cached record for these files, or {} (missing, unreadable, another version or other files)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    expected = _identity(annotation_file, image_dir)
    if not isinstance(record, dict) or any(record.get(k) != v for k, v in expected.items()):
        return {}
    headers = record.get("headers")
    if not isinstance(headers, dict) or not all(
        isinstance(v, list) and len(v) == 4 and all(is_int(n) for n in v) for v in headers.values()
    ):
        record["headers"] = {}
    return record


def _cached_report(cache: dict[str, Any]) -> SplitReport | None:
    try:
        return SplitReport(**cache["report"])
    except (KeyError, TypeError):
        return None


def _write_cache(path: Path, annotation_file: Path, image_dir: Path, record: dict[str, Any]) -> None:
    try:
        write_json(path, {**_identity(annotation_file, image_dir), **record}, indent=None)
    except OSError as err:
        log.warning(
            "cannot record the COCO set-up check in %s (%s): the next set-up checks every image again; "
            "set task.data.cache_dir to a writable folder",
            path,
            err,
        )
