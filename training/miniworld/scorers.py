"""The small world's evaluation in DreamBench's shape: subject fidelity and text controllability.

- ``appearance``: cosine of a trained appearance encoder's embeddings of the generated image and the
  reference render (full images, as DINO-I compares them);
- ``shape_acc``, ``texture_acc``, ``delta_e``: the generated subject's exact attributes, read by a
  classifier, against the subject's (CIE76 delta-E of the unordered colour pair; lower is better);
- ``text_acc`` / ``text_prob``: does the image show what the caption asks (background colour, pattern,
  position, size, and the companion when there is one): the mean over those attributes of
  (predicted == asked), and of the probability of the asked value (the CLIP-T analogue).

``train_scorers(folder, seed, quick)`` trains them from renders (or loads them), ``validate`` measures
each on real renders of held-out subjects in held-out contexts, ``score_images`` scores generations.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from einops import einsum

from .scorer_data import as_images, context_labels, reference_render, render_pool, subject_labels
from .scorer_models import (
    CONTEXT_HEADS,
    CONTEXT_VALUES,
    FILE,
    Scorers,
    load_scorers,
    pair_delta_e,
    predicted_colors,
    read_metadata,
    save_scorers,
)
from .scorer_training import ScorerConfig, scorer_config, train_all
from .world import SHAPES, TEXTURES, Context, Subject

log = logging.getLogger(__name__)
VALIDATION_SEED = 1234          # the validation renders do not depend on the training seed


@torch.no_grad()
def score_per_image(scorers: Scorers, images, contexts: Sequence[Context], *,
                    subjects: Sequence[Subject] | None = None, references=None) -> dict[str, np.ndarray]:
    """Every score of every image; ``companion_acc``/``companion_prob`` are NaN where no companion is asked.

    images, references: uint8 (B, S, S, 3) renders or float (B, 3, S, S) in [0, 1]. With ``subjects`` the
    attributes are compared with the subjects' own (and, without ``references``, the appearance with a
    render of each subject in ``REFERENCE_CONTEXT``); with ``references`` only, with what the attribute
    classifier reads from the references. Shapes: -> {name: (B,)}.
    """
    size = scorers.net.image_size
    x = as_images(images, "images", size)
    if subjects is None and references is None:
        raise ValueError("score_per_image needs the subjects, their reference renders, or both; found neither")
    for name, given in (("contexts", contexts), ("subjects", subjects), ("references", references)):
        if given is not None and len(given) != len(x):
            raise ValueError(f"{name}: expected one per image ({len(x)}), found {len(given)}")
    if references is None:
        references = np.stack([reference_render(s, size) for s in subjects])
    refs = as_images(references, "references", size)
    out = {"appearance": einsum(scorers.appearance(x), scorers.appearance(refs), "b d, b d -> b")}

    # subject attributes, against the subjects' own or against what the references show
    pred = scorers.subject(x)
    if subjects is not None:
        truth = subject_labels(subjects)
    else:
        ref = scorers.subject(refs)
        truth = {"shape": ref["shape"].argmax(-1), "texture": ref["texture"].argmax(-1),
                 "colors": predicted_colors(ref["colors"])}
    out["shape_acc"] = (pred["shape"].argmax(-1) == truth["shape"]).float()
    out["texture_acc"] = (pred["texture"].argmax(-1) == truth["texture"]).float()
    out["delta_e"] = pair_delta_e(predicted_colors(pred["colors"]), truth["colors"])

    # what the caption asks: the companion only when it names one
    logits, asked = scorers.context(x), context_labels(contexts)
    counted = {name: torch.ones(len(x)) for name in CONTEXT_HEADS}
    counted["companion"] = torch.tensor([c.companion is not None for c in contexts], dtype=torch.float32)
    hits, probs = {}, {}
    for name in CONTEXT_HEADS:
        hits[name] = (logits[name].argmax(-1) == asked[name]).float()
        probs[name] = logits[name].softmax(-1).gather(1, asked[name][:, None])[:, 0]
        unasked = torch.where(counted[name] > 0, 0.0, float("nan"))
        out[f"{name}_acc"], out[f"{name}_prob"] = hits[name] + unasked, probs[name] + unasked
    total = sum(counted.values())
    out["text_acc"] = sum(hits[n] * counted[n] for n in CONTEXT_HEADS) / total
    out["text_prob"] = sum(probs[n] * counted[n] for n in CONTEXT_HEADS) / total
    return {name: value.numpy().astype(np.float64) for name, value in out.items()}


def score_images(scorers: Scorers, images, contexts: Sequence[Context], *,
                 subjects: Sequence[Subject] | None = None, references=None) -> dict[str, float]:
    """The batch means of ``score_per_image`` (the companion's over the images that ask for one; left out when none
    does)."""
    per_image = score_per_image(scorers, images, contexts, subjects=subjects, references=references)
    return {name: float(np.nanmean(values)) for name, values in per_image.items() if not np.isnan(values).all()}


@torch.no_grad()
def validate(scorers: Scorers, n_subjects: int = 300, seed: int = VALIDATION_SEED) -> dict[str, dict[str, float]]:
    """Each scorer's accuracy on real renders of held-out subjects, each in two held-out contexts.

    appearance: top-1 retrieval of a subject's second scene among all subjects' second scenes, and the mean
    cosine of the same subject vs of different subjects; subject: shape/texture accuracy and mean delta-E
    (with ``delta_e_other``, the delta-E to another subject's colours, as its scale); context: accuracy per
    attribute (companion: none/ball/block; ``companion_shown_acc`` over the scenes that show one). ``chance``
    holds the accuracy of guessing (for the companion, of always answering the most common value, "none").
    """
    pool = render_pool(n_subjects, 2, scorers.net.image_size, np.random.default_rng(seed), held_out_subjects=1.0,
                       held_out_contexts=True)
    first, second = (torch.from_numpy(pool.images[:, v]).permute(0, 3, 1, 2).float() / 255 for v in (0, 1))
    sim = einsum(scorers.appearance(first), scorers.appearance(second), "i d, j d -> i j")
    same, n = sim.diagonal(), len(sim)
    appearance = {"top1": float((sim.argmax(1) == torch.arange(n)).float().mean()), "same_cos": float(same.mean()),
                  "other_cos": float((sim.sum() - same.sum()) / (n * n - n)),
                  "same_beats_other": float((same[:, None] > sim).float().sum() / (n * n - n))}
    images = torch.cat([first, second])
    subjects, contexts = list(pool.subjects) * 2, [c[0] for c in pool.contexts] + [c[1] for c in pool.contexts]
    pred, truth = scorers.subject(images), subject_labels(subjects)
    subject = {"shape_acc": float((pred["shape"].argmax(-1) == truth["shape"]).float().mean()),
               "texture_acc": float((pred["texture"].argmax(-1) == truth["texture"]).float().mean()),
               "delta_e": float(pair_delta_e(predicted_colors(pred["colors"]), truth["colors"]).mean()),
               "delta_e_other": float(pair_delta_e(truth["colors"].roll(1, 0), truth["colors"]).mean())}
    logits, asked = scorers.context(images), context_labels(contexts)
    hits = {name: logits[name].argmax(-1) == asked[name] for name in CONTEXT_HEADS}
    shown = asked["companion"] > 0
    context = {**{f"{name}_acc": float(hit.float().mean()) for name, hit in hits.items()},
               "companion_shown_acc": float(hits["companion"][shown].float().mean())}
    chance = {"top1": 1 / n, "shape_acc": 1 / len(SHAPES), "texture_acc": 1 / len(TEXTURES),
              **{f"{name}_acc": 1 / len(values) for name, values in CONTEXT_VALUES.items()},
              "companion_acc": float(torch.bincount(asked["companion"]).max() / len(images)),   # always "none"
              "companion_shown_acc": 1 / len(CONTEXT_VALUES["companion"])}
    return {"appearance": appearance, "subject": subject, "context": context, "chance": chance,
            "renders": {"subjects": n, "images": len(images)}}


def train_scorers(folder: str | Path, seed: int = 0, quick: bool = False) -> Scorers:
    """Trains the scorers, validates them and writes ``folder/scorers.safetensors``; loads that file instead when
    it holds scorers of the same configuration, and refuses (ValueError) to overwrite one of another."""
    path, cfg = Path(folder) / FILE, scorer_config(seed, quick)
    wanted = asdict(cfg)
    if path.is_file():
        found = read_metadata(path).get("config")
        if found != wanted:
            raise ValueError(f"{path} holds scorers trained with {found}, not the asked {wanted}: remove it or "
                             "choose another folder")
        return load_scorers(path)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    scorers, stats = train_all(cfg)
    report = validate(scorers, n_subjects=cfg.val_subjects)
    scorers.meta = {"config": wanted, "validation": report, **stats, "load_average": load}
    log.info("scorers trained in %s s (load %.1f): %s", stats["seconds"], load or -1, report)
    save_scorers(path, scorers)
    return scorers


__all__ = ["FILE", "ScorerConfig", "Scorers", "load_scorers", "score_images", "score_per_image", "train_scorers",
           "validate"]
