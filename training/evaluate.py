"""``python -m training.evaluate``: the DreamBench protocol (CLIP-T, CLIP-I, DINO-I; reconstruction vs editing).

    python -m training.evaluate --checkpoint runs/sd15/customcontrast.safetensors --config eval_sd15.json
    python -m training.evaluate --tiny --subjects dog,cat --prompts 2 --images 1     # CPU smoke run
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from customcontrast_core import checkpoint
from customcontrast_core.config import get_preset
from customcontrast_core.visual_kv import CustomContrastModel

from .config import ModelPaths
from .data.dataset import load_view
from .eval.generate import SampleSettings, SubjectSampler
from .eval.metrics import ClipScorer, DinoScorer, crop_to_mask, mean_pairwise, paired_cosine
from .eval.protocol import RECONSTRUCTION, Protocol, load_subjects, prompts_for, read_prompts
from .eval.report import grid, load_image, save_image, scatter, write_reports
from .models import build_from_paths, build_tiny
from .processors import unet_kv_weights

log = logging.getLogger(__name__)
DEFAULT_SUBJECTS = Path(__file__).resolve().parents[2] / "shared" / "data" / "dreambench"


def parse(argv: Sequence[str] | None):
    p = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--subjects-root", type=Path, default=DEFAULT_SUBJECTS)
    p.add_argument("--subjects", help="comma-separated subject names (default: all)")
    p.add_argument("--prompts", type=int, help="use only the first N editing prompts per subject")
    p.add_argument("--images", type=int, default=4, help="images per prompt")
    p.add_argument("--gammas", default="1.0", help="comma-separated γ values (a scatter is drawn over them)")
    p.add_argument("--checkpoint", type=Path, help="CustomContrast .safetensors to evaluate")
    p.add_argument("--config", type=Path, help="JSON with 'paths' (ModelPaths), 'clip_weights', 'dino_dir', 'sam'")
    p.add_argument("--tiny", action="store_true", help="tiny random models (pipeline check on CPU)")
    p.add_argument("--out", type=Path, default=Path("eval"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int)
    p.add_argument("--resolution", type=int)
    return p.parse_args(argv)


def build(args, extra: dict):
    if args.tiny:
        config = get_preset("tiny")
        frozen = build_tiny(config, image_size=args.resolution, reference_size=32)
        if args.checkpoint:
            model, _ = checkpoint.load(args.checkpoint)
        else:
            torch.manual_seed(0)
            model = CustomContrastModel(config)
            model.visual_kv.load_from_unet(unet_kv_weights(frozen.unet, model))
        return frozen, model, ClipScorer("ViT-B-32", None), DinoScorer(tiny=True), None
    if not args.checkpoint:
        raise SystemExit("--checkpoint is required (or --tiny)")
    model, info = checkpoint.load(args.checkpoint)
    frozen = build_from_paths(info.config, ModelPaths(**extra.get("paths", {})))
    masker = None
    if extra.get("sam"):
        from .data.masks import GroundingDinoBoxes, SamMasker
        sam = SamMasker(extra["sam"], extra.get("sam_type", "vit_b"), cache_dir=args.out / "masks")
        boxes = GroundingDinoBoxes(extra["grounding_dino"]) if extra.get("grounding_dino") else None
        masker = sam if boxes is None else _BoxedMasker(sam, boxes, {s.name: s.cls for s in
                                                                     load_subjects(args.subjects_root)})
    return frozen, model, ClipScorer("ViT-B-32", extra.get("clip_weights")), DinoScorer(extra.get("dino_dir")), masker


class _BoxedMasker:
    """SAM prompted by GroundingDINO's box for the class word (whole image when nothing is found)."""

    def __init__(self, sam, boxes, classes: dict[str, str]) -> None:
        self.sam, self.boxes, self.classes = sam, boxes, classes   # subject folder name -> class word

    def __call__(self, path: Path) -> Path:
        cls = self.classes.get(Path(path).parent.name)   # references and generations both sit in <subject>/
        box = self.boxes(path, cls) if cls else None
        return self.sam(path, box)


def main(argv: Sequence[str] | None = None) -> Path:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse(argv)
    args.steps = args.steps or (4 if args.tiny else 50)
    args.resolution = args.resolution or (64 if args.tiny else 512)
    extra = json.loads(args.config.read_text()) if args.config else {}
    gammas = tuple(float(g) for g in args.gammas.split(","))
    protocol = Protocol(images_per_prompt=args.images, seed=args.seed, steps=args.steps, resolution=args.resolution,
                        gammas=gammas)
    subjects = load_subjects(args.subjects_root, args.subjects.split(",") if args.subjects else None)
    objects, live = read_prompts(args.subjects_root / "prompts_and_classes.txt")
    frozen, model, clip, dino, masker = build(args, extra)
    sampler = SubjectSampler(frozen, model)
    out = args.out
    plan = {s.name: [RECONSTRUCTION] + prompts_for(s, objects, live, protocol.extra_categories)[:args.prompts]
            for s in subjects}

    def generate(method: str, gamma: float | None) -> dict[tuple[str, int, int], Path]:
        files = {}
        jobs = [(s, i, p, n) for s in subjects for i, p in enumerate(plan[s.name]) for n in range(args.images)]
        for s, i, p, n in tqdm(jobs, desc=f"generating {method}"):
            path = out / "images" / method / s.name / f"{i:02d}_{n}.png"
            if not path.exists():   # resumable: images already generated are reused
                settings = SampleSettings(steps=args.steps, resolution=args.resolution, gamma=gamma or 0.0)
                reference = load_view(s.reference, None)[0] if gamma is not None else None
                prompt = p.with_subject(s.cls) if gamma is not None else p.with_class(s.cls)
                save_image(sampler(prompt, reference, settings, seed=args.seed + n), path)
            files[(s.name, i, n)] = path
        return files

    def segmented(path_or_image) -> torch.Tensor:
        image = load_image(path_or_image) if isinstance(path_or_image, Path) else path_or_image
        if masker is None or not isinstance(path_or_image, Path):
            return image
        return crop_to_mask(image, load_view(str(path_or_image), str(masker(path_or_image)))[1][0])

    refs = {s.name: [segmented(Path(p)) for p in s.images] for s in subjects}
    ref_clip = {k: clip.images(v) for k, v in refs.items()}
    ref_dino = {k: dino.images(v) for k, v in refs.items()}

    def score(files) -> tuple[dict, dict]:
        rows, cats = {"R-CI": [], "E-CI": [], "R-DI": [], "E-DI": [], "CLIP-T": []}, {}
        for s in tqdm(subjects, desc="scoring"):
            for i, p in enumerate(plan[s.name]):
                images = [load_image(files[(s.name, i, n)]) for n in range(args.images)]
                seg = [segmented(files[(s.name, i, n)]) for n in range(args.images)]
                ci = mean_pairwise(clip.images(seg), ref_clip[s.name]).item()
                di = mean_pairwise(dino.images(seg), ref_dino[s.name]).item()
                ct = paired_cosine(clip.images(images), clip.texts([p.with_class(s.cls)] * len(images))).item()
                kind = "R" if p.category == "reconstruction" else "E"
                rows[f"{kind}-CI"].append(ci)
                rows[f"{kind}-DI"].append(di)
                if kind == "E":
                    rows["CLIP-T"].append(ct)
                    c = cats.setdefault(p.category, {"CLIP-T": [], "E-CI": [], "E-DI": []})
                    c["CLIP-T"].append(ct), c["E-CI"].append(ci), c["E-DI"].append(di)
        mean = lambda v: sum(v) / len(v) if v else float("nan")  # noqa: E731
        return ({k: mean(v) for k, v in rows.items()} | {"ImageReward": "absent"},
                {c: {k: mean(v) for k, v in d.items()} for c, d in cats.items()})

    report = {"protocol": dataclasses.asdict(protocol) | {
        "segmentation_used": "SAM" if masker else "none (no SAM checkpoint given)",
        "references": {s.name: s.reference for s in subjects}, "subjects": [s.name for s in subjects],
        "models": {"checkpoint": str(args.checkpoint) if args.checkpoint else "random tiny",
                   "tiny": args.tiny, **{k: str(v) for k, v in extra.items()}},
        "versions": {"torch": torch.__version__}},
        "methods": {}, "categories": {}}
    points = []
    for gamma in gammas:
        name = f"CustomContrast γ={gamma:g}"
        files = generate(f"customcontrast_g{gamma:g}", gamma)
        report["methods"][name], report["categories"][name] = score(files)
        points.append((gamma, report["methods"][name]["CLIP-T"], report["methods"][name]["E-CI"]))
        for s in subjects:
            grid([[Path(s.reference)] + [files[(s.name, i, n)] for n in range(args.images)]
                  for i in range(len(plan[s.name]))], out / "grids" / f"{s.name}_g{gamma:g}.png")
    report["methods"]["base model, no subject (lower bound)"], _ = score(generate("base", None))
    upper = {"CLIP-T": float("nan"), "ImageReward": "absent"}
    for key, feats in (("CI", ref_clip), ("DI", ref_dino)):
        values = [mean_pairwise(f, f, exclude_diagonal=True).item() for f in feats.values()]
        values = [v for v in values if not math.isnan(v)]
        upper[f"R-{key}"] = upper[f"E-{key}"] = sum(values) / len(values) if values else float("nan")
    report["methods"]["reference images (upper bound)"] = upper
    write_reports(out, report)
    scatter(points, out / "similarity_vs_controllability.png")
    log.info("report written to %s", out / "report.json")
    return out / "report.json"


if __name__ == "__main__":
    main()
