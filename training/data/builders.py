"""Manifest builders for common dataset layouts; unreadable files are skipped and logged."""
from __future__ import annotations

import csv
import logging
from collections.abc import Mapping
from pathlib import Path

from PIL import Image

from .manifest import SubjectRecord

log = logging.getLogger(__name__)
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


def _readable(path: Path) -> bool:
    try:
        with Image.open(path) as img:
            img.verify()
        return True
    except Exception as err:   # PIL raises many types for broken files
        log.warning("skipping unreadable image %s: %s", path, err)
        return False


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS and _readable(p))


def read_dreambench_classes(path: Path) -> dict[str, str]:
    """The ``subject_name,class`` table of DreamBench's ``prompts_and_classes.txt``."""
    classes, started = {}, False
    for line in path.read_text().splitlines():
        if line.strip() == "subject_name,class":
            started = True
            continue
        if started:
            if not line.strip() or "," not in line:
                break
            subject, cls = line.split(",", 1)
            classes[subject.strip()] = cls.strip()
    return classes


def from_subject_folders(root: str | Path, *, classes: Mapping[str, str] | None = None) -> list[SubjectRecord]:
    """One folder per subject (DreamBench layout); classes from ``prompts_and_classes.txt`` when present."""
    root = Path(root)
    if classes is None and (root / "prompts_and_classes.txt").is_file():
        classes = read_dreambench_classes(root / "prompts_and_classes.txt")
    records = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        images = _images(folder)
        if not images:
            continue
        cls = (classes or {}).get(folder.name, folder.name.split("_")[0])
        records.append(SubjectRecord(subject=folder.name, cls=cls, images=tuple(str(p) for p in images)))
    return records


def from_mvimgnet(root: str | Path, *, class_names: Mapping[str, str] | None = None) -> list[SubjectRecord]:
    """MVImgNet layout ``root/<category>/<object>/images/*.jpg`` (+ optional ``masks/<stem>.png``)."""
    records = []
    for category in sorted(p for p in Path(root).iterdir() if p.is_dir()):
        for obj in sorted(p for p in category.iterdir() if (p / "images").is_dir()):
            images = _images(obj / "images")
            masks = [obj / "masks" / f"{p.stem}.png" for p in images]
            has_masks = bool(images) and all(m.is_file() for m in masks)
            if len(images) < 2:
                log.warning("skipping %s: %d readable frames, need 2", obj, len(images))
                continue
            records.append(SubjectRecord(subject=f"{category.name}/{obj.name}",
                                         cls=(class_names or {}).get(category.name, category.name),
                                         images=tuple(str(p) for p in images),
                                         masks=tuple(str(m) for m in masks) if has_masks else None))
    return records


def from_openimages_csv(csv_path: str | Path, images_dir: str | Path, masks_dir: str | Path, *,
                        label_names: Mapping[str, str] | None = None) -> list[SubjectRecord]:
    """OpenImages segmentation CSV (MaskPath, ImageID, LabelName, ...): one single-view subject per mask.

    OpenImages has one view per object, so these records have one image (train on them with the config field
    ``allow_single_view=true``, which reads the manifest with ``allow_single=True``); the dataset then takes the
    target and positive views from the same photo, augmented, as FastComposer does.
    """
    records = []
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            image = Path(images_dir) / f"{row['ImageID']}.jpg"
            mask = Path(masks_dir) / row["MaskPath"]
            if not (image.is_file() and mask.is_file() and _readable(image)):
                log.warning("skipping %s: image or mask missing or unreadable", row.get("MaskPath"))
                continue
            label = row["LabelName"]
            records.append(SubjectRecord(subject=Path(row["MaskPath"]).stem,
                                         cls=(label_names or {}).get(label, label), images=(str(image),),
                                         masks=(str(mask),)))
    return records
