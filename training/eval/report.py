"""Evaluation outputs: report.json, a Markdown table in the paper's layout, image grids, a γ scatter."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from PIL import Image

COLUMNS = ["CLIP-T", "R-CI", "E-CI", "R-DI", "E-DI", "ImageReward"]


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return value if isinstance(value, str) else f"{value:.3f}"


def markdown(report: dict) -> str:
    lines = ["| method | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name, row in report["methods"].items():
        lines.append(f"| {name} | " + " | ".join(_fmt(row.get(c)) for c in COLUMNS) + " |")
    lines += ["", "Per prompt category (CustomContrast rows; style and shape are our own prompts, not in the "
              "headline):", "", "| method | category | pairs | CLIP-T | E-CI | E-DI |", "|---|---|---|---|---|---|"]
    for name, cats in report["categories"].items():
        for cat, row in cats.items():
            lines.append(f"| {name} | {cat} | {row.get('pairs', '—')} | {_fmt(row['CLIP-T'])} | {_fmt(row['E-CI'])} "
                         f"| {_fmt(row['E-DI'])} |")
    p = report["protocol"]
    lines += ["", f"Protocol: {p['images_per_prompt']} image(s) per prompt, seeds {p['seed']}..., {p['steps']} DDIM "
              f"steps, CFG {p['guidance']}, {p['resolution']} px; CLIP {p['clip_model']} (open_clip), DINO "
              f"{p['dino_model']} (CLS of the last hidden state); raw cosines (no scaling); subjects segmented by "
              f"{p['segmentation_used']}; CLIP-T uses the prompt with the class word in place of the placeholder.",
              "", f"Headline: {p.get('headline', '—')}."]
    return "\n".join(lines) + "\n"


def write_reports(out: Path, report: dict) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True))
    (out / "report.md").write_text(markdown(report))


def grid(rows: list[list[Path]], path: Path, cell: int = 128) -> Path:
    """One row per prompt: the reference, then the generations."""
    width = max(len(r) for r in rows)
    canvas = Image.new("RGB", (cell * width, cell * len(rows)), (255, 255, 255))
    for y, row in enumerate(rows):
        for x, file in enumerate(row):
            with Image.open(file) as img:
                canvas.paste(img.convert("RGB").resize((cell, cell)), (x * cell, y * cell))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def scatter(points: list[tuple[float, float, float]], path: Path) -> Path:
    """Subject similarity (E-CI) against controllability (CLIP-T), one point per γ."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(4, 3.2))
    ax.plot([p[1] for p in points], [p[2] for p in points], "o-")
    for gamma, x, y in points:
        ax.annotate(f"γ={gamma:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("CLIP-T (text alignment)")
    ax.set_ylabel("E-CI (subject similarity)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


KEY_FIELD = "customcontrast-generation-key"


def save_image(image: torch.Tensor, path: Path, key: str | None = None) -> None:
    """A PNG, written atomically; ``key`` (what the image was generated from) goes in a text chunk (``saved_key``)."""
    from PIL.PngImagePlugin import PngInfo
    path.parent.mkdir(parents=True, exist_ok=True)
    array = (image.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()
    info = PngInfo()
    if key is not None:
        info.add_text(KEY_FIELD, key)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(array).save(tmp, format="PNG", pnginfo=info)
    tmp.replace(path)


def saved_key(path: Path) -> str | None:
    """The generation key stored by ``save_image`` (None when the file is absent, unreadable or has none)."""
    try:
        with Image.open(path) as img:
            return getattr(img, "text", {}).get(KEY_FIELD)
    except OSError:
        return None


def load_image(path: Path) -> torch.Tensor:
    import numpy as np
    with Image.open(path) as img:
        return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
