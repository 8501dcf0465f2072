"""Procedural multi-view synthetic subjects: the tiny preset's data.

Each subject is a shape with its own colours and texture; each view shows it rotated, scaled,
squashed (a stand-in for viewpoint) and moved, on a different background, with an exact mask.
Deterministic for a seed (byte-identical files).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .manifest import SubjectRecord, write_manifest

log = logging.getLogger(__name__)
SHAPES = ("disc", "square", "triangle", "star", "ring", "cross", "diamond", "hexagon")
TEXTURES = ("plain", "stripes", "dots", "checker")


def _polygon(shape: str, rng: np.random.Generator) -> np.ndarray:
    """Unit-size outline of a shape centred at 0. Shapes: -> (P, 2)."""
    if shape in ("disc", "ring"):
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        return np.stack([np.cos(t), np.sin(t)], 1)
    if shape == "star":
        t = np.linspace(0, 2 * np.pi, 10, endpoint=False)
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        return np.stack([r * np.cos(t), r * np.sin(t)], 1)
    if shape == "cross":
        a, b = 1.0, 0.35
        return np.array([[-b, -a], [b, -a], [b, -b], [a, -b], [a, b], [b, b], [b, a], [-b, a], [-b, b], [-a, b],
                         [-a, -b], [-b, -b]])
    sides = {"square": 4, "triangle": 3, "diamond": 4, "hexagon": 6}[shape]
    offset = np.pi / 4 if shape == "square" else 0.0
    t = np.linspace(0, 2 * np.pi, sides, endpoint=False) + offset
    return np.stack([np.cos(t), np.sin(t)], 1)


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    kind = rng.integers(3)
    base = rng.uniform(0, 255, 3)
    if kind == 0:      # gradient
        other = rng.uniform(0, 255, 3)
        ramp = np.linspace(0, 1, size)[:, None, None]
        img = base * (1 - ramp) + other * ramp
        return np.broadcast_to(img, (size, size, 3)).copy()
    if kind == 1:      # noise
        return np.clip(base + rng.normal(0, 40, (size, size, 3)), 0, 255)
    period = int(rng.integers(4, 12))
    stripes = ((np.arange(size)[:, None] // period) % 2).astype(float)[..., None]
    return base * stripes + rng.uniform(0, 255, 3) * (1 - stripes) * np.ones((size, size, 3))


def _texture(size: int, colors: np.ndarray, texture: str) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size]
    if texture == "stripes":
        sel = (x + y) // 5 % 2
    elif texture == "dots":
        sel = ((x % 8 - 4) ** 2 + (y % 8 - 4) ** 2 < 6).astype(int)
    elif texture == "checker":
        sel = (x // 6 + y // 6) % 2
    else:
        sel = np.zeros_like(x)
    return colors[sel]


def render_view(shape: str, colors: np.ndarray, texture: str, size: int, rng: np.random.Generator) -> tuple[Image.Image, Image.Image]:
    """Renders one view of a subject and its exact binary mask."""
    outline = _polygon(shape, rng)
    angle = rng.uniform(0, 2 * np.pi)
    squash = rng.uniform(0.6, 1.0)
    scale = size * rng.uniform(0.22, 0.34)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    pts = (outline * [1.0, squash]) @ rot.T * scale
    center = rng.uniform(size * 0.35, size * 0.65, 2)
    pts = pts + center
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    draw.polygon([tuple(p) for p in pts], fill=255)
    if shape == "ring":
        inner = (outline * [0.5, 0.5 * squash]) @ rot.T * scale + center
        draw.polygon([tuple(p) for p in inner], fill=0)
    m = np.asarray(mask) > 127
    image = _background(size, rng)
    image[m] = _texture(size, colors, texture)[m]
    return Image.fromarray(image.astype(np.uint8)), Image.fromarray((m * 255).astype(np.uint8))


def generate_synthetic(out_dir: str | Path, *, num_subjects: int, views: int = 4, size: int = 64,
                       seed: int = 0) -> Path:
    """Writes ``num_subjects`` subjects × ``views`` views (PNG + mask) and their manifest; returns its path."""
    if num_subjects < 2 or views < 2:
        raise ValueError(f"need at least 2 subjects and 2 views, found {num_subjects} subjects, {views} views")
    out = Path(out_dir).resolve()
    records = []
    for s in range(num_subjects):
        rng = np.random.default_rng([seed, s])
        shape = SHAPES[s % len(SHAPES)]
        texture = TEXTURES[(s // len(SHAPES)) % len(TEXTURES)]
        colors = rng.uniform(0, 255, (2, 3))
        folder = out / f"subject_{s:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        images, masks = [], []
        for v in range(views):
            image, mask = render_view(shape, colors, texture, size, rng)
            image.save(folder / f"view_{v}.png")
            mask.save(folder / f"mask_{v}.png")
            images.append(str(folder / f"view_{v}.png"))
            masks.append(str(folder / f"mask_{v}.png"))
        records.append(SubjectRecord(subject=f"subject_{s:04d}", cls=shape, images=tuple(images), masks=tuple(masks)))
    log.info("wrote %d synthetic subjects x %d views to %s", num_subjects, views, out)
    return write_manifest(out / "manifest.jsonl", records)
