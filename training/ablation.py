"""``python -m training.ablation``: are S+ embeddings view-invariant, with or without CSCL / MACL?

Trains the tiny preset four ways (paper Table 4, IDs 2-5: no contrastive term, CSCL only, MACL only,
both) with identical seeds and steps, then encodes held-out procedural subjects (never seen in
training) from every view and measures view retrieval (top-1, mAP), the intra/inter-subject cosine
distance ratio, for S+ tokens and for the visual CLS; several seeds, mean and spread.

    python -m training.ablation                 # default: 2 seeds x 4 variants x 120 steps (~3 min, 2 cores)
    python -m training.ablation --quick         # pipeline check
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
from collections.abc import Sequence
from pathlib import Path

import torch

from customcontrast_core import checkpoint

from .config import get_train_preset
from .data import DataConfig, SubjectDataset, generate_synthetic, load_view, read_manifest
from .eval.retrieval import distance_ratio, mean_average_precision, pca_2d, top1_same_subject
from .loop import train
from .models import build_tiny, clip_hidden_states

log = logging.getLogger(__name__)
VARIANTS = {"none": (), "cscl": ("cscl",), "macl": ("macl",), "both": ("cscl", "macl")}
METRICS = ("top1", "mAP", "ratio")


def embed_views(model_path: Path, manifest: Path, seed: int, size: int, timestep: float = 500.0) -> dict:
    """S+ tokens and visual CLS of every view of every held-out subject."""
    model, info = checkpoint.load(model_path)
    frozen = build_tiny(info.config, image_size=size, reference_size=32, seed=seed)
    records = read_manifest(manifest)
    dataset = SubjectDataset(records, DataConfig(reference_size=32, target_size=size, augment=False))
    splus, cls, labels, views = [], [], [], []
    with torch.no_grad():
        for s, record in enumerate(records):
            for v, (image, mask) in enumerate(zip(record.images, record.masks)):
                pixels, m = load_view(image, mask)
                reference, _ = dataset._reference(pixels, m, torch.Generator().manual_seed(0))
                hidden = clip_hidden_states(frozen.clip_vision, reference[None], info.config.clip_layers)
                out = model.encoder(hidden, torch.tensor([timestep]))
                splus.append(out.splus[0])
                cls.append(out.visual_cls[0])
                labels.append(s)
                views.append(v)
    return {"splus": torch.stack(splus), "cls": torch.stack(cls), "labels": torch.tensor(labels),
            "views": torch.tensor(views)}


def scores(emb: dict) -> dict:
    out = {}
    for space in ("splus", "cls"):
        x, y = emb[space], emb["labels"]
        out[space] = {"top1": top1_same_subject(x, y), "mAP": mean_average_precision(x, y),
                      "ratio": distance_ratio(x, y)}
    return out


def plot(emb: dict, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    xy = pca_2d(emb["splus"])
    markers = "os^Dv<>p"
    fig, ax = plt.subplots(figsize=(4, 4))
    cmap = plt.get_cmap("tab20")
    for i in range(len(xy)):
        ax.scatter(xy[i, 0], xy[i, 1], color=cmap(int(emb["labels"][i]) % 20),
                   marker=markers[int(emb["views"][i]) % len(markers)], s=28)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([]), ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def summarize(results: dict) -> dict:
    """Mean and sample standard deviation over seeds for every variant, space and metric."""
    table = {}
    for variant, per_seed in results.items():
        table[variant] = {}
        for space in ("splus", "cls"):
            table[variant][space] = {}
            for metric in METRICS:
                values = [r[space][metric] for r in per_seed]
                spread = statistics.stdev(values) if len(values) > 1 else 0.0
                table[variant][space][metric] = {"mean": statistics.fmean(values), "std": spread, "n": len(values)}
    return table


def markdown(table: dict, settings: dict) -> str:
    lines = ["| variant | S+ top-1 | S+ mAP | S+ intra/inter | CLS top-1 | CLS mAP | CLS intra/inter |",
             "|---|---|---|---|---|---|---|"]
    for variant, spaces in table.items():
        cells = [f"{spaces[s][m]['mean']:.3f} ± {spaces[s][m]['std']:.3f}" for s in ("splus", "cls") for m in METRICS]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Settings: {json.dumps(settings)}")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> Path:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(prog="python -m training.ablation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/ablation"))
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--train-subjects", type=int, default=24)
    p.add_argument("--heldout-subjects", type=int, default=12)
    p.add_argument("--views", type=int, default=4)
    p.add_argument("--quick", action="store_true", help="1 seed, 3 steps, few subjects: checks the pipeline")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.train_subjects, args.heldout_subjects = "0", 3, 8, 4
    seeds = [int(s) for s in args.seeds.split(",")]
    size = 64
    heldout = generate_synthetic(args.out / "heldout", num_subjects=args.heldout_subjects, views=args.views,
                                 size=size, seed=10_000)   # other seed: colours/textures never seen in training
    results: dict[str, list] = {v: [] for v in VARIANTS}
    base = get_train_preset("tiny")
    for seed in seeds:
        for variant, terms in VARIANTS.items():
            run_dir = args.out / f"{variant}_seed{seed}"
            cfg = dataclasses.replace(base, output_dir=str(run_dir), steps=args.steps, seed=seed,
                                      synthetic_subjects=args.train_subjects, synthetic_views=args.views,
                                      contrastive_terms=terms, save_every=args.steps)
            model_path = run_dir / "customcontrast.safetensors"
            if not model_path.exists():
                train(cfg)
            emb = embed_views(model_path, heldout, seed, size)
            results[variant].append(scores(emb))
            if seed == seeds[0]:
                plot(emb, args.out / f"pca_{variant}.png", f"{variant}: S+ of held-out views (PCA)")
    table = summarize(results)
    settings = {"seeds": seeds, "steps": args.steps, "train_subjects": args.train_subjects,
                "heldout_subjects": args.heldout_subjects, "views": args.views, "timestep": 500,
                "lambda_contrast": base.lambda_contrast}
    (args.out / "ablation.json").write_text(json.dumps({"settings": settings, "per_seed": results,
                                                         "summary": table}, indent=2))
    (args.out / "ablation.md").write_text(markdown(table, settings))
    log.info("wrote %s", args.out / "ablation.md")
    return args.out / "ablation.json"


if __name__ == "__main__":
    main()
