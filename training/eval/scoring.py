"""Scores of one method's generations: the headline row over DreamBench's 25 prompts, and per category."""
from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence

from torch import Tensor

from .metrics import mean_pairwise, paired_cosine
from .protocol import EvalPrompt, EvalSubject

HEADLINE = ("R-CI", "E-CI", "R-DI", "E-DI", "CLIP-T")


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def score(subjects: Sequence[EvalSubject], plan: Mapping[str, Sequence[EvalPrompt]],
          files: Mapping[tuple[str, int, int], Hashable], images_per_prompt: int, clip, dino,
          ref_clip: Mapping[str, Tensor], ref_dino: Mapping[str, Tensor],
          load: Callable[[Hashable], Tensor], segment: Callable[[Hashable], Tensor]) -> tuple[dict, dict]:
    """(headline row, {category: row}) of the images ``files[(subject, prompt index, n)]``.

    Per (subject, prompt): CLIP-I / DINO-I = mean cosine of the segmented generations against every segmented
    reference photo, CLIP-T = mean cosine of each generation with the prompt (class word, no placeholder).
    The headline R-CI/R-DI come from the reconstruction prompt; CLIP-T, E-CI and E-DI from DreamBench's prompts
    only (``EvalPrompt.dreambench``), each a mean over (subject, prompt) pairs. Every editing prompt, DreamBench's
    and our extra style/shape ones, is also reported under its category.
    """
    rows: dict[str, list[float]] = {k: [] for k in HEADLINE}
    cats: dict[str, dict[str, list[float]]] = {}
    for s in subjects:
        for i, p in enumerate(plan[s.name]):
            keys = [files[(s.name, i, n)] for n in range(images_per_prompt)]
            seg = [segment(k) for k in keys]
            ci = mean_pairwise(clip.images(seg), ref_clip[s.name]).item()
            di = mean_pairwise(dino.images(seg), ref_dino[s.name]).item()
            if p.category == "reconstruction":
                rows["R-CI"].append(ci)
                rows["R-DI"].append(di)
                continue
            ct = paired_cosine(clip.images([load(k) for k in keys]),
                               clip.texts([p.with_class(s.cls)] * len(keys))).item()
            if p.dreambench:
                rows["E-CI"].append(ci)
                rows["E-DI"].append(di)
                rows["CLIP-T"].append(ct)
            c = cats.setdefault(p.category, {"CLIP-T": [], "E-CI": [], "E-DI": []})
            c["CLIP-T"].append(ct), c["E-CI"].append(ci), c["E-DI"].append(di)
    headline = {k: _mean(v) for k, v in rows.items()} | {"ImageReward": "absent",
                                                         "dreambench_pairs": len(rows["CLIP-T"])}
    categories = {c: {k: _mean(v) for k, v in d.items()} | {"pairs": len(d["CLIP-T"])}
                  for c, d in cats.items()}
    return headline, categories


def self_similarity(features: Mapping[str, Tensor]) -> float:
    """Mean over subjects of the reference photos' cosine with each other (the upper-bound row)."""
    values = [mean_pairwise(f, f, exclude_diagonal=True).item() for f in features.values()]
    return _mean([v for v in values if not math.isnan(v)])
