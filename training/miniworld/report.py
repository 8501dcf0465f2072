"""The small world's report: every variant generates the held-out subjects, the scorers measure them.

Rows of the table (DreamBench's shape, paper Table 1): R- = the reference's own context (reconstruction
prompt), E- = held-out contexts (editing prompts). Columns: subject fidelity (appearance similarity to
the reference, the DINO-I analogue; attribute accuracy and colour distance) and text controllability
(the prompt's background, pattern, position and size shown: the CLIP-T analogue).
Variants: the lower bound (base model, class word), the upper bound (real renders of the subject in
that context), each trained variant, and inference-time variants of the full model.
"""
from __future__ import annotations

import json
import logging
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from customcontrast_core import checkpoint
from customcontrast_core.config import get_preset
from customcontrast_core.visual_kv import CustomContrastModel
from customcontrast_core.masks import MaskConfig

from ..eval.generate import SampleSettings, SubjectSampler, reference_view
from .base import load_base
from .data import REFERENCE_CONTEXT, EvalCase, read_eval, subject_caption
from .world import Context

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Generator:
    """How one column of the table makes its images."""

    name: str
    trained: str | None              # trained variant whose checkpoint is used (None: base model or real renders)
    reference: bool = True           # the reference reaches the model
    placeholder: bool = True         # the prompt names the subject by the placeholder (S+)
    described: bool = False          # without the placeholder: the subject's coarse words, not only its class word
    gamma: float = 1.0               # visual branch weight
    use_mask: bool = True
    mask_mode: str = "soft"
    all_seeds: bool = True           # False: the first seed's model only (inference-time variants)


GENERATORS = (
    Generator("lower bound (base, class word)", None, reference=False, placeholder=False),
    # what the frozen UNet draws from the subject's words (hue bins, texture): no reference, no training
    Generator("base, described in words", None, reference=False, placeholder=False, described=True),
    Generator("CustomContrast", "full"),
    Generator("lambda1 = 0", "no_contrast"),
    Generator("CSCL only", "cscl_only"),
    Generator("MACL only", "macl_only"),
    Generator("S+ only (visual off)", "full", gamma=0.0, all_seeds=False),
    Generator("visual only (no S+)", "full", placeholder=False, use_mask=False, all_seeds=False),
    Generator("no mask propagation", "full", use_mask=False, all_seeds=False),
    Generator("hard mask", "full", mask_mode="topk", all_seeds=False),
)
UPPER = "upper bound (real renders)"
AUTOENCODED = "real renders through the autoencoder"   # the latent space's own ceiling: what any base could reach


def _prompt(case: EvalCase, ctx: Context, gen: Generator, fine_words: bool) -> str:
    if gen.placeholder:
        return subject_caption(case.subject, ctx)
    return ctx.words(case.subject.description(fine_words) if gen.described else case.subject.shape)


def _load(path: str) -> torch.Tensor:
    with Image.open(path) as img:
        return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)


def generate_column(gen: Generator, model, frozen, cases: list[EvalCase], cfg, seeds: int = 1,
                    images: dict | None = None) -> dict:
    """Images of one generator: {(case, prompt index): (N, 3, H, W)}; prompt 0 is the R- prompt. ``images``:
    {case name: ImageFeatures} used instead of encoding those cases' references (``oracles``)."""
    size = cfg.world.image_size
    sampler = SubjectSampler(frozen, model)
    settings = SampleSettings(steps=cfg.sample_steps, guidance=cfg.guidance, resolution=size, gamma=gen.gamma,
                              use_mask=gen.use_mask and gen.reference, mask=MaskConfig(mode=gen.mask_mode))
    out = {}
    for case in cases:
        ref = reference_view(case.reference, case.reference_mask, size, case.subject.shape) if gen.reference \
            else None
        for p, ctx in enumerate((REFERENCE_CONTEXT, *case.contexts)):
            prompt = _prompt(case, ctx, gen, cfg.world.fine_words)
            image = (images or {}).get(case.name)
            out[case.name, p] = torch.stack([sampler(prompt, ref, settings, seed=s, image=image)
                                             for s in range(seeds)])
    return out


def real_column(cases: list[EvalCase], out: Path, size: int) -> dict:
    """The upper bound: real renders (the R- prompt's are the reference context's, rendered again)."""
    from .data import save_png
    from .world import render
    column = {}
    for case in cases:
        rng = np.random.default_rng([zlib.crc32(case.name.encode()), 40])
        again = save_png(render(case.subject, REFERENCE_CONTEXT, size, rng)[0], out / case.name / "real_r.png")
        column[case.name, 0] = _load(again)[None]
        for p, renders in enumerate(case.renders, start=1):
            column[case.name, p] = torch.stack([_load(r) for r in renders])
    return column


@torch.no_grad()
def autoencoded(column: dict, frozen) -> dict:
    """``column``'s images encoded (latent mean) and decoded by the base model's autoencoder.
    Shapes: each (N, 3, H, W) in [0, 1] -> the same."""
    def through(images: torch.Tensor) -> torch.Tensor:
        latents = frozen.vae.encode(images * 2 - 1).latent_dist.mean
        return ((frozen.vae.decode(latents).sample + 1) / 2).clamp(0, 1)
    return {key: through(images) for key, images in column.items()}


def write_report(out: Path, cfg) -> Path:
    """Generates, scores and writes ``report/table.md``, ``report/results.json`` and ``report/picture.png``."""
    from .scorers import FILE, load_scorers
    report = out / "report"
    report.mkdir(parents=True, exist_ok=True)
    cases = read_eval(out / "world" / "eval")
    scorers = load_scorers(out / "scorers" / FILE)
    config = get_preset(cfg.encoder_preset)
    frozen = load_base(out / "base", config, cfg.world.image_size, cfg.world.image_size)
    seeds = {v.name: cfg.seeds if v.all_seeds else cfg.seeds[:1] for v in cfg.variants}
    results: dict[str, list[dict]] = {}
    columns: dict[str, dict] = {UPPER: real_column(cases, report / "real", cfg.world.image_size)}
    results[UPPER] = [score_column(scorers, cases, columns[UPPER])]
    columns[AUTOENCODED] = autoencoded(columns[UPPER], frozen)
    results[AUTOENCODED] = [score_column(scorers, cases, columns[AUTOENCODED])]
    for gen in GENERATORS:
        runs = [None] if gen.trained is None else list(seeds.get(gen.trained, ()))
        runs = runs if gen.all_seeds else runs[:1]
        for seed in runs:
            if gen.trained is None:
                model = CustomContrastModel(config)   # unused: no reference reaches it
            else:
                path = out / "runs" / f"{gen.trained}_seed{seed}" / "customcontrast.safetensors"
                model, _ = checkpoint.load(path)
            column = generate_column(gen, model, frozen, cases, cfg)
            results.setdefault(gen.name, []).append(score_column(scorers, cases, column))
            if seed in (None, cfg.seeds[0]):
                columns[gen.name] = column
    (report / "results.json").write_text(json.dumps(results, indent=1))
    (report / "table.md").write_text(table(results))
    picture(cases[0], columns, report / "picture.png")
    return report


def score_column(scorers, cases: list[EvalCase], column: dict) -> dict:
    """Mean scores of one column, split into R- (prompt 0) and E- (held-out contexts); the fidelity scores
    compare with the case's reference view (appearance) and its subject's true attributes."""
    from .scorers import score_images
    sums: dict[str, list[float]] = {}
    for case in cases:
        reference = _load(case.reference)
        for p, ctx in enumerate((REFERENCE_CONTEXT, *case.contexts)):
            images = column[case.name, p]
            n = len(images)
            scores = score_images(scorers, images, [ctx] * n, subjects=[case.subject] * n,
                                  references=reference.expand(n, -1, -1, -1))
            for key, value in scores.items():
                sums.setdefault(("R-" if p == 0 else "E-") + key, []).append(value)
    return {k: float(np.mean(v)) for k, v in sums.items()}


HEADLINE = ("appearance", "shape_acc", "texture_acc", "delta_e", "text_acc")   # the rest is in results.json


def table(results: dict[str, list[dict]]) -> str:
    """Markdown: one row per generator, mean ± std over seeds of the headline scores, R- then E-."""
    keys = [f"{split}-{k}" for split in ("R", "E") for k in HEADLINE]
    lines = ["| variant | seeds | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for name, runs in results.items():
        cells = []
        for k in keys:
            values = [r[k] for r in runs if k in r]
            cells.append(f"{np.mean(values):.3f} ± {np.std(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}")
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def picture(case: EvalCase, columns: dict[str, dict], path: Path, scale: int = 3) -> None:
    """Reference | one generation per column, one row per prompt."""
    names = list(columns)
    prompts = sorted({p for (c, p) in next(iter(columns.values())) if c == case.name})
    reference = _load(case.reference)
    rows = []
    for p in prompts:
        tiles = [reference] + [columns[n][case.name, p][0] for n in names]
        rows.append(torch.cat([torch.nn.functional.pad(t, (1, 1, 1, 1), value=1.0) for t in tiles], dim=2))
    grid = (torch.cat(rows, dim=1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)
    (path.with_suffix(".json")).write_text(json.dumps({"columns": ["reference", *names],
                                                       "rows": [str(p) for p in prompts]}, indent=1))
