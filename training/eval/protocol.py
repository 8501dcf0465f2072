"""The evaluation protocol: DreamBench subjects, prompts, categories, seeds and reference choice."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

LIVE_CLASSES = {"cat", "dog"}     # DreamBench's 9 live subjects are cats and dogs
PLACEHOLDER = "<subject>"
DREAMBENCH_CATEGORIES = ("scene", "accessory", "property")   # DreamBench's 25 prompts: the headline metrics
# prompts of our own, beyond DreamBench's 25 (style and shape changes): reported per category, never in the headline
EXTRA_PROMPTS = {
    "style": ["a watercolor painting of a {0} {1}", "a pencil sketch of a {0} {1}",
              "a {0} {1} in the style of a pixel-art video game"],
    "shape": ["a tiny {0} {1} held in a hand", "a giant {0} {1} towering over a city"],
}


@dataclass(frozen=True)
class EvalPrompt:
    """One prompt template: {0} is the placeholder, {1} the class word."""

    template: str
    category: str          # scene, accessory, property, style, shape, reconstruction

    @property
    def dreambench(self) -> bool:
        """One of DreamBench's 25 editing prompts (the headline CLIP-T, E-CI and E-DI are over these only)."""
        return self.category in DREAMBENCH_CATEGORIES

    def with_subject(self, cls: str) -> str:
        return self.template.format(PLACEHOLDER, cls)

    def with_class(self, cls: str) -> str:
        """The same prompt with the class word only (CLIP-T text and the no-subject baseline)."""
        return re.sub(r"\s+", " ", self.template.format("", cls)).strip()


RECONSTRUCTION = EvalPrompt("a photo of a {0} {1}", "reconstruction")


@dataclass(frozen=True)
class EvalSubject:
    name: str
    cls: str
    images: tuple[str, ...]
    reference: str                 # the image given to the encoder (first file, recorded in the report)
    live: bool


@dataclass(frozen=True)
class Protocol:
    """Everything that fixes the numbers: recorded with every result."""

    images_per_prompt: int = 4
    seed: int = 0
    steps: int = 50
    guidance: float = 7.5
    resolution: int = 512
    gammas: tuple[float, ...] = (1.0,)
    clip_model: str = "ViT-B-32"          # open_clip, for CLIP-T and CLIP-I
    dino_model: str = "dino-vits16"       # transformers ViT, class token of the last hidden state
    dino_preprocessing: str = "Resize(256, bicubic) of the shorter side, CenterCrop(224), ImageNet mean/std (hub)"
    segmentation: str = "SAM box prompt (GroundingDINO box on the class word when given, else whole image)"
    extra_categories: tuple[str, ...] = ("style", "shape")
    headline: str = ("CLIP-T, E-CI (DreamBench CLIP-I) and E-DI (DreamBench DINO-I) over DreamBench's 25 prompts "
                     "(live list for cats and dogs, object list otherwise), mean over (subject, prompt) pairs; "
                     "R-CI and R-DI on the reconstruction prompt; the style and shape prompts only per category")
    notes: dict = field(default_factory=dict)


def _parse_prompt_list(lines: list[str]) -> list[str]:
    out = []
    for line in lines:
        match = re.match(r"\s*'(.*)'\.format\(unique_token, class_token\)", line)
        if match:
            out.append(match.group(1))
    return out


def read_prompts(path: Path) -> tuple[list[str], list[str]]:
    """DreamBench's 25 object and 25 live-subject prompt templates from ``prompts_and_classes.txt``."""
    text = path.read_text().splitlines()
    live_at = next(i for i, line in enumerate(text) if line.strip() == "Live Subject Prompts")
    objects, live = _parse_prompt_list(text[:live_at]), _parse_prompt_list(text[live_at:])
    if len(objects) != 25 or len(live) != 25:
        raise ValueError(f"{path}: expected 25 object and 25 live prompts, found {len(objects)} and {len(live)}")
    return objects, live


def categorize(template: str, live: bool, index: int) -> str:
    """DreamBench's order: 0-9 scene, then accessories (live) or more scenes (objects), 20-24 properties."""
    if index >= 20:
        return "property"
    if live and index >= 10:
        return "accessory"
    return "scene"


def prompts_for(subject: EvalSubject, objects: list[str], live: list[str], extra: tuple[str, ...]) -> list[EvalPrompt]:
    templates = live if subject.live else objects
    out = [EvalPrompt(t, categorize(t, subject.live, i)) for i, t in enumerate(templates)]
    for category in extra:
        out += [EvalPrompt(t, category) for t in EXTRA_PROMPTS[category]]
    return out


def load_subjects(root: Path, names: list[str] | None = None) -> list[EvalSubject]:
    """The subjects of a DreamBench-layout folder; the first image (sorted) is the reference."""
    from ..data.builders import from_subject_folders
    records = from_subject_folders(root)
    if names:
        unknown = sorted(set(names) - {r.subject for r in records})
        if unknown:
            raise ValueError(f"unknown subjects {unknown}; {root} has {sorted(r.subject for r in records)}")
        records = [r for r in records if r.subject in names]
    return [EvalSubject(r.subject, r.cls, r.images, r.images[0], r.cls in LIVE_CLASSES) for r in records]
