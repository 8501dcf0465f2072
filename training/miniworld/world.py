"""The small world: procedural subjects in captioned scenes, with exact masks and held-out splits.

A *subject* is an identity no caption word can name: a shape, a texture and two continuous colours.
A *scene* places one subject at a position, with a size, on a background (a colour word and a
pattern), sometimes beside a second, captioned object. Captions use the subject's class word (its
shape): ``"a small star at the left on a red checkered background beside a ball"``; some of the base
model's captions also give words for the subject's colours and texture (``Subject.description``).

Splits (all deterministic for a seed):
- training subjects: colour pairs and shape-texture pairs of the training sets;
- held-out subjects: a colour-bin pair AND a shape-texture pair never used by a training subject;
- held-out contexts: (background colour, pattern, position, size) combinations never captioned in
  training (every single word still is).
"""
from __future__ import annotations

import colorsys
import itertools
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("disc", "square", "triangle", "star", "ring", "cross", "diamond", "hexagon")
TEXTURES = ("plain", "stripes", "dots", "checker")
POSITIONS = {"left": (0.3, 0.5), "right": (0.7, 0.5), "top": (0.5, 0.3), "bottom": (0.5, 0.7),
             "centre": (0.5, 0.5)}                                    # (x, y) as fractions of the side
# outer radius / side: even a small subject spans several 4 x 4 latent cells, so its texture survives the VAE
SIZES = {"small": 0.17, "large": 0.26}
BACKGROUNDS = {"red": 0.0, "yellow": 0.15, "green": 0.33, "blue": 0.62, "purple": 0.8, "gray": None}  # hues
PATTERNS = ("plain", "checkered", "striped")
COMPANIONS = ("ball", "block")                                        # the second, captioned object
HUE_BINS = 6
# coarse words for a subject's colours (hue bins) and textures, distinct from the background's words
HUE_WORDS = ("orange", "lime", "mint", "azure", "violet", "pink")
TEXTURE_WORDS = {"plain": "", "stripes": "banded", "dots": "spotted", "checker": "tiled"}
SATURATION, VALUE = (0.55, 1.0), (0.75, 1.0)     # ranges of a subject colour's HSV saturation and value
# finer colour words (``Subject.description(fine=True)``): the third of its hue bin a colour lies in, and
# whether its saturation and value lie in the lower half of their ranges
SHADE_WORDS = ("warm", "", "cool")
PALE, DIM = "pale", "dim"
PLACEHOLDER = "<subject>"

# Held out: each shape loses one texture, and complementary hue-bin pairs.
HELD_OUT_SHAPE_TEXTURE = frozenset((s, TEXTURES[i % len(TEXTURES)]) for i, s in enumerate(SHAPES))
HELD_OUT_HUE_PAIRS = frozenset((i, (i + 3) % HUE_BINS) for i in range(HUE_BINS))


@dataclass(frozen=True)
class Subject:
    """One identity: shape, texture and two RGB colours in [0, 1]."""

    shape: str
    texture: str
    colors: tuple[tuple[float, float, float], tuple[float, float, float]]

    @property
    def hue_bins(self) -> tuple[int, int]:
        return tuple(int(_hue_position(c)) % HUE_BINS for c in self.colors)

    def description(self, fine: bool = False) -> str:
        """Coarse words for the subject (hue bins, texture, class word): ``"orange and azure banded star"``.
        They do not name the identity (the colours are continuous within a bin), but they let the base
        model learn to draw a subject's colours and texture from conditioning, as SD learned from text.
        ``fine`` adds, per colour, the third of its hue bin and a word each for a low saturation and value:
        ``"pale warm orange and dim cool azure banded star"`` (still continuous within each word)."""
        first, second = (_colour_words(c, fine) for c in self.colors)
        colours = first if self.texture == "plain" else f"{first} and {second}"
        return " ".join(w for w in (colours, TEXTURE_WORDS[self.texture], self.shape) if w)


def _hue_position(rgb: tuple[float, float, float]) -> float:
    """The colour's hue in bins: its integer part is the hue bin (mod ``HUE_BINS``), the rest where in the bin."""
    return colorsys.rgb_to_hsv(*rgb)[0] * HUE_BINS


def _colour_words(rgb: tuple[float, float, float], fine: bool) -> str:
    _, saturation, value = colorsys.rgb_to_hsv(*rgb)
    position = _hue_position(rgb)
    bin_ = int(position) % HUE_BINS
    if not fine:
        return HUE_WORDS[bin_]
    shade = SHADE_WORDS[min(int((position - int(position)) * 3), 2)]
    pale, dim = saturation < sum(SATURATION) / 2, value < sum(VALUE) / 2     # below the middle of their ranges
    words = (PALE if pale else "", DIM if dim else "", shade, HUE_WORDS[bin_])
    return " ".join(w for w in words if w)


@dataclass(frozen=True)
class Context:
    """What a caption says about a scene besides the class word."""

    position: str
    size: str
    background: str
    pattern: str
    companion: str | None = None

    def words(self, word: str) -> str:
        """The caption with ``word`` for the subject (its class word, or placeholder + class word)."""
        where = "in the centre" if self.position == "centre" else f"at the {self.position}"
        text = f"a {self.size} {word} {where} on a {self.background} {self.pattern} background"
        return text + (f" beside a {self.companion}" if self.companion else "")


def context_key(c: Context) -> tuple[str, str, str, str]:
    return c.background, c.pattern, c.position, c.size


ALL_CONTEXTS = tuple(itertools.product(BACKGROUNDS, PATTERNS, POSITIONS, SIZES))
# every 7th combination (in a fixed order) is never captioned in training; each word stays in training
HELD_OUT_CONTEXTS = frozenset(k for i, k in enumerate(ALL_CONTEXTS) if i % 7 == 3)


def _color(rng: np.random.Generator, bins: tuple[int, ...]) -> tuple[float, float, float]:
    hue = (rng.choice(bins) + rng.uniform(0.1, 0.9)) / HUE_BINS
    return colorsys.hsv_to_rgb(hue, rng.uniform(*SATURATION), rng.uniform(*VALUE))


def make_subject(rng: np.random.Generator, held_out: bool) -> Subject:
    """A random subject of the training split, or of the held-out split (both its pairs unseen)."""
    pairs = [p for p in itertools.product(SHAPES, TEXTURES) if (p in HELD_OUT_SHAPE_TEXTURE) == held_out]
    shape, texture = pairs[rng.integers(len(pairs))]
    hue_pairs = [p for p in itertools.product(range(HUE_BINS), repeat=2)
                 if ((p in HELD_OUT_HUE_PAIRS) == held_out) and p[0] != p[1]]
    b1, b2 = hue_pairs[rng.integers(len(hue_pairs))]
    return Subject(shape, texture, (_color(rng, (b1,)), _color(rng, (b2,))))


def make_context(rng: np.random.Generator, held_out: bool, companion_rate: float = 0.3) -> Context:
    keys = [k for k in ALL_CONTEXTS if (k in HELD_OUT_CONTEXTS) == held_out]
    background, pattern, position, size = keys[rng.integers(len(keys))]
    companion = COMPANIONS[rng.integers(len(COMPANIONS))] if rng.uniform() < companion_rate else None
    return Context(position, size, background, pattern, companion)


def _outline(shape: str) -> np.ndarray:
    """Unit-radius outline centred at 0. Shapes: -> (P, 2)."""
    if shape in ("disc", "ring"):
        t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
        return np.stack([np.cos(t), np.sin(t)], 1)
    if shape == "star":
        t = np.linspace(0, 2 * np.pi, 10, endpoint=False)
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        return np.stack([r * np.cos(t), r * np.sin(t)], 1)
    if shape == "cross":
        a, b = 1.0, 0.38
        return np.array([[-b, -a], [b, -a], [b, -b], [a, -b], [a, b], [b, b], [b, a], [-b, a], [-b, b], [-a, b],
                         [-a, -b], [-b, -b]]) * 0.9
    sides, offset = {"square": (4, np.pi / 4), "triangle": (3, -np.pi / 2), "diamond": (4, 0.0),
                     "hexagon": (6, 0.0)}[shape]
    t = np.linspace(0, 2 * np.pi, sides, endpoint=False) + offset
    scale = (1.0, 0.62) if shape == "diamond" else (1.0, 1.0)
    return np.stack([np.cos(t) * scale[0], np.sin(t) * scale[1]], 1)


def _texture_select(texture: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Which of the two colours each pixel takes, in the subject's own (rotated) unit coordinates.

    Coarse on purpose: every part is at least half a radius wide (4+ pixels of a large subject at 32 x 32),
    larger than the autoencoder's 4 x 4 cell, so the latent space can hold it."""
    if texture == "stripes":     # three bands: a middle one of the second colour
        return (np.abs(u) < 0.5).astype(int)
    if texture == "dots":        # two large spots (off-centre, so a ring shows them too)
        return ((np.abs(u) - 0.55) ** 2 + v ** 2 < 0.35 ** 2).astype(int)
    if texture == "checker":     # quadrants
        return ((u > 0) ^ (v > 0)).astype(int)
    return np.zeros_like(u, dtype=int)


def _background(ctx: Context, size: int) -> np.ndarray:
    hue = BACKGROUNDS[ctx.background]
    base = np.array(colorsys.hsv_to_rgb(hue, 0.7, 0.45) if hue is not None else (0.42, 0.42, 0.42))
    other = base * 0.55
    y, x = np.mgrid[0:size, 0:size]
    period = max(2, size // 8)
    sel = {"plain": np.zeros_like(x), "checkered": (x // period + y // period) % 2,
           "striped": (y // period) % 2}[ctx.pattern]
    return np.where(sel[..., None] == 1, other, base)


def render(subject: Subject, ctx: Context, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One view: the subject in its scene, and the subject's exact mask.

    Shapes: -> image (size, size, 3) uint8, mask (size, size) bool.
    """
    px, py = POSITIONS[ctx.position]
    radius = SIZES[ctx.size] * size * rng.uniform(0.92, 1.08)
    center = np.array([px, py]) * size + rng.uniform(-0.03, 0.03, 2) * size
    angle, squash = rng.uniform(0, 2 * np.pi), rng.uniform(0.8, 1.0)    # pose: the views' viewpoint change
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    image = _background(ctx, size)
    if ctx.companion:   # the second object sits on the other side of the image
        cx, cy = size - center[0], size - center[1]
        if ctx.position == "centre":
            cx, cy = size * 0.15, size * 0.85
        r = 0.09 * size
        companion = Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(companion)
        box = [cx - r, cy - r, cx + r, cy + r]
        draw.ellipse(box, fill=255) if ctx.companion == "ball" else draw.rectangle(box, fill=255)
        color = (0.95, 0.95, 0.92) if ctx.companion == "ball" else (0.08, 0.08, 0.08)
        image[np.asarray(companion) > 127] = color
    outline = _outline(subject.shape) * [1.0, squash] @ rot.T * radius + center
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    draw.polygon([tuple(p) for p in outline], fill=255)
    if subject.shape == "ring":
        draw.polygon([tuple(p) for p in _outline("ring") * [0.5, 0.5 * squash] @ rot.T * radius + center], fill=0)
    mask = np.asarray(canvas) > 127
    y, x = np.mgrid[0:size, 0:size] + 0.5
    local = (np.stack([x - center[0], y - center[1]], -1) @ rot) / radius       # undo the pose
    sel = _texture_select(subject.texture, local[..., 0], local[..., 1] / squash)
    colors = np.array(subject.colors)
    image[mask] = colors[sel][mask]
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8), mask
