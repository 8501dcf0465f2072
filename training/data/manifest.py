"""The JSONL subject manifest: one subject per line (DESIGN.md section 6).

``{"subject": "dog6", "class": "dog", "images": ["dog6/00.jpg", ...], "masks": [...] | null, "caption": null}``
Paths are relative to the manifest's folder (absolute paths are kept). Every line is checked before
training starts; a subject listed more than once is reported.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
FIELDS = ("subject", "class", "images", "masks", "caption", "captions")
JSON_KINDS = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
              float: "a number", type(None): "null"}


@dataclass(frozen=True)
class SubjectRecord:
    """One subject: several views (frames) of the same object, with optional masks."""

    subject: str
    cls: str
    images: tuple[str, ...]
    masks: tuple[str, ...] | None = None
    caption: str | None = None
    captions: tuple[str, ...] | None = None   # one caption per image (scenes that differ per view); wins over caption

    def __post_init__(self) -> None:
        for name, value, optional in (("subject", self.subject, False), ("class", self.cls, False),
                                      ("caption", self.caption, True)):
            if not (isinstance(value, str) or (optional and value is None)):
                raise ValueError(f"subject {self.subject!r}: {name} must be a string{' or null' if optional else ''}, "
                                 f"found {found(value)}")
        object.__setattr__(self, "images", tuple(str(p) for p in self.images))
        if self.masks is not None:
            object.__setattr__(self, "masks", tuple(str(p) for p in self.masks))
            if len(self.masks) != len(self.images):
                raise ValueError(f"subject {self.subject!r}: {len(self.images)} images but {len(self.masks)} masks")
        if not self.images:
            raise ValueError(f"subject {self.subject!r} has no images")
        if self.captions is not None:
            captions = tuple(self.captions) if isinstance(self.captions, (list, tuple)) else None
            if captions is None or len(captions) != len(self.images) or not all(isinstance(c, str) for c in captions):
                raise ValueError(f"subject {self.subject!r}: captions must be null or a list of one string per image "
                                 f"({len(self.images)}), found {found(self.captions)}")
            object.__setattr__(self, "captions", captions)

    def to_json(self, root: Path) -> str:
        rel = lambda p: os.path.relpath(Path(p).resolve(), root.resolve())  # noqa: E731
        return json.dumps({"subject": self.subject, "class": self.cls, "images": [rel(p) for p in self.images],
                           "masks": [rel(p) for p in self.masks] if self.masks else None, "caption": self.caption,
                           **({"captions": list(self.captions)} if self.captions is not None else {})})


def found(value: Any) -> str:
    """A JSON value as an error message shows it: its kind and (shortened) text."""
    kind = JSON_KINDS.get(type(value), type(value).__name__)
    return kind if value is None else f"{kind} {json.dumps(value)[:80]}"


def _paths(data: dict, field: str, optional: bool) -> list[str] | None:
    value = data.get(field)
    if optional and value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(p, str) and p for p in value):
        raise ValueError(f"'{field}' must be {'null or ' if optional else ''}a list of path strings, found "
                         f"{found(value)}")
    return value


def _record(data: Any, root: Path, allow_single: bool) -> SubjectRecord:
    """One manifest line as a record; ValueError saying what was expected and found."""
    if not isinstance(data, dict):
        raise ValueError(f'expected a JSON object {{"subject": ..., "class": ..., "images": [...]}}, found '
                         f"{found(data)}")
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown fields {unknown}; expected {', '.join(FIELDS)}")
    for field in ("subject", "class", "images"):
        if field not in data:
            raise ValueError(f"missing field {field!r}; expected subject, class, images")
    images, masks = _paths(data, "images", optional=False), _paths(data, "masks", optional=True)
    if len(images) < 2 and not allow_single:
        raise ValueError(f"subject {data['subject']!r} has {len(images)} image; training needs "
                         "at least 2 views (reference != target); for single-view data (OpenImages) set "
                         "allow_single_view=true in the training config (read_manifest(..., allow_single=True))")
    resolve = lambda p: str(p if Path(p).is_absolute() else root / p)  # noqa: E731
    return SubjectRecord(subject=data["subject"], cls=data["class"], images=tuple(resolve(p) for p in images),
                         masks=tuple(resolve(p) for p in masks) if masks is not None else None,
                         caption=data.get("caption"), captions=data.get("captions"))


def _warn_repeats(path: Path, records: Sequence[SubjectRecord], lines: Sequence[int]) -> None:
    """Warns about subjects listed more than once (by name or by their images): the contrastive losses take
    every line as a different subject, so copies in one batch are pushed apart as negatives."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for record, number in zip(records, lines):
        groups["name", record.subject].append(number)
        groups["images", record.images].append(number)
    for (kind, key), numbers in groups.items():
        if len(numbers) > 1:
            what = f"subject {key!r}" if kind == "name" else f"the same images ({key[0]}, ...)"
            log.warning("%s: %s is listed %d times (lines %s): every line is taken as a different subject, so "
                        "copies in one batch become each other's contrastive negatives; list each subject once",
                        path, what, len(numbers), ", ".join(map(str, numbers[:10])) + (", ..." if len(numbers) > 10 else ""))


def read_manifest(path: str | Path, *, allow_single: bool = False) -> list[SubjectRecord]:
    """Reads and validates every line of a manifest before anything trains; errors name the file, the line,
    what was expected and what was found. Subjects listed more than once are warned about."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no subject manifest at {path}")
    try:
        text = path.read_text()
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: expected a UTF-8 JSONL text file, found undecodable bytes ({err.reason})") from None
    records, lines = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from None
        try:
            records.append(_record(data, path.parent, allow_single))
        except ValueError as err:
            raise ValueError(f"{path}:{number}: {err}") from None
        lines.append(number)
    if not records:
        raise ValueError(f"{path} holds no subjects")
    _warn_repeats(path, records, lines)
    return records


def write_manifest(path: str | Path, records: Sequence[SubjectRecord]) -> Path:
    """Writes a manifest atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write("".join(r.to_json(path.parent) + "\n" for r in records))
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)   # mkstemp makes 0600 whatever the umask
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
