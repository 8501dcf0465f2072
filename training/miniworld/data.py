"""The small world's datasets, written once per seed and size and read back from disk.

- ``scenes.npz``: captioned scenes of training subjects in training contexts (the base model's data).
- ``subjects/manifest.jsonl``: training subjects x views, each view in its own training context, with
  exact masks and per-view captions that hold the placeholder (CustomContrast's data, read by
  ``training.run``).
- ``eval.json`` + ``eval/``: held-out subjects, each with a reference view and, per prompt, the real
  renders of that subject in that context (the upper bound).
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..data.manifest import SubjectRecord, write_manifest
from .world import PLACEHOLDER, Context, Subject, make_context, make_subject, render

log = logging.getLogger(__name__)
REFERENCE_CONTEXT = Context("centre", "large", "gray", "plain")   # how the reference photo is taken


@dataclass(frozen=True)
class WorldConfig:
    """How much of the world is written."""

    image_size: int = 32
    scenes: int = 20_000          # base-model training scenes
    subjects: int = 300           # CustomContrast training subjects
    views: int = 4
    eval_subjects: int = 10       # held-out subjects
    eval_prompts: int = 4         # editing prompts (held-out contexts) per held-out subject
    eval_renders: int = 4         # real renders per (subject, prompt): the upper bound's samples
    describe_subjects: float = 0.5   # share of base-model captions with the subject's coarse colour/texture words
    fine_words: bool = False         # finer colour words in them too (Subject.description; docs/miniworld.md)
    seed: int = 0


@dataclass(frozen=True)
class EvalCase:
    """One held-out subject: its reference view and the contexts it is asked for."""

    name: str
    subject: Subject
    reference: str
    reference_mask: str
    contexts: tuple[Context, ...]
    renders: tuple[tuple[str, ...], ...]     # per context, real renders of the subject there


def subject_caption(subject: Subject, ctx: Context) -> str:
    return ctx.words(f"{PLACEHOLDER} {subject.shape}")


def save_png(array: np.ndarray, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return str(path)


def write_scenes(path: Path, cfg: WorldConfig) -> None:
    rng = np.random.default_rng([cfg.seed, 10])
    words = np.random.default_rng([cfg.seed, 11])     # its own stream: the scenes do not depend on the rate
    images, captions = [], []
    for _ in range(cfg.scenes):
        subject, ctx = make_subject(rng, held_out=False), make_context(rng, held_out=False)
        image, _ = render(subject, ctx, cfg.image_size, rng)
        images.append(image)
        described = words.uniform() < cfg.describe_subjects
        captions.append(ctx.words(subject.description(cfg.fine_words) if described else subject.shape))
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, images=np.stack(images), captions=np.array(captions))
    tmp.replace(path)


def read_scenes(path: Path) -> tuple[np.ndarray, list[str]]:
    with np.load(path) as data:
        return data["images"], [str(c) for c in data["captions"]]


def write_subjects(folder: Path, cfg: WorldConfig) -> Path:
    records = []
    for k in range(cfg.subjects):
        rng = np.random.default_rng([cfg.seed, 20, k])
        subject = make_subject(rng, held_out=False)
        images, masks, captions = [], [], []
        for v in range(cfg.views):
            ctx = make_context(rng, held_out=False)
            image, mask = render(subject, ctx, cfg.image_size, rng)
            images.append(save_png(image, folder / f"s{k:04d}" / f"view_{v}.png"))
            masks.append(save_png((mask * 255).astype(np.uint8), folder / f"s{k:04d}" / f"mask_{v}.png"))
            captions.append(subject_caption(subject, ctx))
        records.append(SubjectRecord(subject=f"s{k:04d}", cls=subject.shape, images=tuple(images),
                                     masks=tuple(masks), captions=tuple(captions)))
    return write_manifest(folder / "manifest.jsonl", records)


def held_out_subject(cfg: WorldConfig, k: int) -> tuple[Subject, tuple, list[Context], list[list[tuple]]]:
    """The k-th held-out subject from its own random stream: the subject, its reference render, its evaluation
    contexts and, per context, its real renders (each render an (image, mask) pair, as ``render`` returns).
    ``write_eval`` saves them; ``write_held_out_manifest`` re-renders the same images with their masks."""
    rng = np.random.default_rng([cfg.seed, 30, k])
    subject = make_subject(rng, held_out=True)
    reference = render(subject, REFERENCE_CONTEXT, cfg.image_size, rng)
    contexts, renders = [], []
    for _ in range(cfg.eval_prompts):
        ctx = make_context(rng, held_out=True, companion_rate=0.0)
        contexts.append(ctx)
        renders.append([render(subject, ctx, cfg.image_size, rng) for _ in range(cfg.eval_renders)])
    return subject, reference, contexts, renders


def write_eval(folder: Path, cfg: WorldConfig) -> list[EvalCase]:
    cases = []
    for k in range(cfg.eval_subjects):
        subject, (image, mask), contexts, renders = held_out_subject(cfg, k)
        name = f"heldout_{k:02d}"
        reference = save_png(image, folder / name / "reference.png")
        reference_mask = save_png((mask * 255).astype(np.uint8), folder / name / "reference_mask.png")
        paths = tuple(tuple(save_png(real, folder / name / f"real_{p}_{r}.png") for r, (real, _) in enumerate(row))
                      for p, row in enumerate(renders))
        cases.append(EvalCase(name, subject, reference, reference_mask, tuple(contexts), paths))
    (folder / "eval.json").write_text(json.dumps([asdict(c) for c in cases], indent=1))
    return cases


def write_held_out_manifest(folder: Path, cfg: WorldConfig, subjects: int) -> Path:
    """The first ``subjects`` held-out subjects as CustomContrast training data (``training.run``'s manifest):
    each one's reference scene and every real render of its evaluation contexts (the evaluation's own images),
    with exact masks and placeholder captions. Trained on, they give the ``memorized`` oracle
    (``training.miniworld.oracles``): what the one-shot model carries for subjects whose test scenes it has seen."""
    if not 1 <= subjects <= cfg.eval_subjects:
        raise ValueError(f"held-out manifest: expected 1 to {cfg.eval_subjects} subjects (the world's held-out "
                         f"subjects), found {subjects}")
    records = []
    for k in range(subjects):
        subject, reference, contexts, renders = held_out_subject(cfg, k)
        name = f"heldout_{k:02d}"
        scenes = [(REFERENCE_CONTEXT, reference)] + [(ctx, r) for ctx, row in zip(contexts, renders) for r in row]
        images = tuple(save_png(image, folder / name / f"view_{v}.png") for v, (_, (image, _)) in enumerate(scenes))
        masks = tuple(save_png((mask * 255).astype(np.uint8), folder / name / f"mask_{v}.png")
                      for v, (_, (_, mask)) in enumerate(scenes))
        records.append(SubjectRecord(subject=name, cls=subject.shape, images=images, masks=masks,
                                     captions=tuple(subject_caption(subject, ctx) for ctx, _ in scenes)))
    return write_manifest(folder / "manifest.jsonl", records)


def read_eval(folder: Path) -> list[EvalCase]:
    cases = []
    for c in json.loads((folder / "eval.json").read_text()):
        s = c["subject"]
        subject = Subject(s["shape"], s["texture"], tuple(tuple(x) for x in s["colors"]))
        cases.append(EvalCase(c["name"], subject, c["reference"], c["reference_mask"],
                              tuple(Context(**x) for x in c["contexts"]), tuple(tuple(r) for r in c["renders"])))
    return cases


def write_world(folder: str | Path, cfg: WorldConfig) -> Path:
    """Writes every dataset of the world into ``folder`` (each part skipped when already complete)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stamp = folder / "world.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == asdict(cfg):
        return folder
    write_scenes(folder / "scenes.npz", cfg)
    write_subjects(folder / "subjects", cfg)
    write_eval(folder / "eval", cfg)
    stamp.write_text(json.dumps(asdict(cfg)))
    log.info("wrote the world (%d scenes, %d subjects x %d views, %d held-out subjects) to %s",
             cfg.scenes, cfg.subjects, cfg.views, cfg.eval_subjects, folder)
    return folder
