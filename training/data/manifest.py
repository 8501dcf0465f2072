"""The JSONL subject manifest: one subject per line (DESIGN.md section 6).

``{"subject": "dog6", "class": "dog", "images": ["dog6/00.jpg", ...], "masks": [...] | null, "caption": null}``
Paths are relative to the manifest's folder (absolute paths are kept).
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class SubjectRecord:
    """One subject: several views (frames) of the same object, with optional masks."""

    subject: str
    cls: str
    images: tuple[str, ...]
    masks: tuple[str, ...] | None = None
    caption: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "images", tuple(str(p) for p in self.images))
        if self.masks is not None:
            object.__setattr__(self, "masks", tuple(str(p) for p in self.masks))
            if len(self.masks) != len(self.images):
                raise ValueError(f"subject {self.subject!r}: {len(self.images)} images but {len(self.masks)} masks")
        if not self.images:
            raise ValueError(f"subject {self.subject!r} has no images")

    def to_json(self, root: Path) -> str:
        rel = lambda p: os.path.relpath(Path(p).resolve(), root.resolve())  # noqa: E731
        return json.dumps({"subject": self.subject, "class": self.cls, "images": [rel(p) for p in self.images],
                           "masks": [rel(p) for p in self.masks] if self.masks else None, "caption": self.caption})


def read_manifest(path: str | Path, *, allow_single: bool = False) -> list[SubjectRecord]:
    """Reads and validates a manifest; errors name the line and the field."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no subject manifest at {path}")
    root = path.parent
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from None
        for field in ("subject", "class", "images"):
            if field not in data:
                raise ValueError(f"{path}:{number}: missing field {field!r}; expected subject, class, images")
        images = data["images"]
        if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
            raise ValueError(f"{path}:{number}: 'images' must be a list of paths")
        if len(images) < 2 and not allow_single:
            raise ValueError(f"{path}:{number}: subject {data['subject']!r} has {len(images)} image; training needs "
                             "at least 2 views (reference != target); for single-view data (OpenImages) set "
                             "allow_single_view=true in the training config (read_manifest(..., allow_single=True))")
        resolve = lambda p: str(p if Path(p).is_absolute() else root / p)  # noqa: E731
        masks = data.get("masks")
        try:
            records.append(SubjectRecord(subject=str(data["subject"]), cls=str(data["class"]),
                                         images=tuple(resolve(p) for p in images),
                                         masks=tuple(resolve(p) for p in masks) if masks else None,
                                         caption=data.get("caption")))
        except ValueError as err:
            raise ValueError(f"{path}:{number}: {err}") from None
    if not records:
        raise ValueError(f"{path} holds no subjects")
    return records


def write_manifest(path: str | Path, records: Sequence[SubjectRecord]) -> Path:
    """Writes a manifest atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write("".join(r.to_json(path.parent) + "\n" for r in records))
    os.replace(tmp, path)
    return path
