"""``python -m training.evaluate``: the DreamBench protocol (CLIP-T, CLIP-I, DINO-I; reconstruction vs editing).

    python -m training.evaluate --checkpoint runs/sd15/customcontrast.safetensors --config eval_sd15.json
    python -m training.evaluate --tiny --subjects dog,cat --prompts 2 --images 1     # CPU smoke run
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from customcontrast_core import checkpoint
from customcontrast_core.config import get_preset
from customcontrast_core.visual_kv import CustomContrastModel

from .config import ModelPaths
from .data.dataset import load_view
from .eval.generate import SampleSettings, SubjectSampler, file_sha256, generation_key, reference_view
from .eval.metrics import ClipScorer, DinoScorer, crop_to_mask
from .eval.protocol import RECONSTRUCTION, Protocol, load_subjects, prompts_for, read_prompts
from .eval.report import grid, load_image, save_image, saved_key, scatter, write_reports
from .eval.scoring import score, self_similarity
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
    p.add_argument("--config", type=Path, help="JSON with 'paths' (ModelPaths), 'clip_weights' and 'dino_dir' "
                   "(required local paths), optional 'sam', 'sam_type', 'grounding_dino'")
    p.add_argument("--tiny", action="store_true", help="tiny random models (pipeline check on CPU)")
    p.add_argument("--out", type=Path, default=Path("eval"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int)
    p.add_argument("--resolution", type=int)
    return p.parse_args(argv)


METRIC_MODELS = (("clip_weights", "an open_clip ViT-B-32 weights file", Path.is_file),
                 ("dino_dir", "a DINO ViT-S/16 folder (transformers format)", Path.is_dir))


def check_config(extra: dict, source: Path | None) -> None:
    """Outside ``--tiny`` the metric models must be local paths that exist: a random CLIP or DINO gives numbers
    that look plausible and mean nothing, and nothing is downloaded."""
    where = f"--config {source}" if source else "--config (none given)"
    for key, kind, exists in METRIC_MODELS:
        value = extra.get(key)
        if not value:
            found = "no such key" if key not in extra else f"{value!r}"
            raise ValueError(f"{where}: key {key!r} must give the local path of {kind}; found {found} "
                             f"(random metric models are only used with --tiny)")
        if not exists(Path(value)):
            raise FileNotFoundError(f"{where}: key {key!r} must give the local path of {kind}; found no such "
                                    f"{'file' if exists is Path.is_file else 'folder'} at {value}")


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
        return frozen, model, ClipScorer("ViT-B-32", None, tiny=True), DinoScorer(tiny=True), None
    if not args.checkpoint:
        raise SystemExit("--checkpoint is required (or --tiny)")
    check_config(extra, args.config)
    model, info = checkpoint.load(args.checkpoint)
    frozen = build_from_paths(info.config, ModelPaths(**extra.get("paths", {})))
    masker = None
    if extra.get("sam"):
        from .data.masks import GroundingDinoBoxes, SamMasker
        sam = SamMasker(extra["sam"], extra.get("sam_type", "vit_b"), cache_dir=args.out / "masks")
        boxes = GroundingDinoBoxes(extra["grounding_dino"]) if extra.get("grounding_dino") else None
        masker = sam if boxes is None else _BoxedMasker(sam, boxes, {s.name: s.cls for s in
                                                                     load_subjects(args.subjects_root)})
    return frozen, model, ClipScorer("ViT-B-32", extra["clip_weights"]), DinoScorer(extra["dino_dir"]), masker


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
    # what every generated image depends on; an image on disk is reused only when its stored key matches
    checkpoint_id = f"sha256:{file_sha256(args.checkpoint)}" if args.checkpoint else "random tiny model (seed 0)"
    base_id = "tiny preset (seed 0)" if args.tiny else extra.get("paths", {})
    segmentation_id = {k: extra.get(k) for k in ("sam", "sam_type", "grounding_dino")} if masker else None
    reference_size = frozen.clip_vision.size
    reference_ids = {s.name: {"sha256": file_sha256(s.reference), "segmentation": segmentation_id,
                              "size": reference_size} for s in subjects}
    reference_images: dict[str, torch.Tensor] = {}

    def encoder_reference(s) -> torch.Tensor:
        """The subject's reference as training builds it (segmented when a masker is configured)."""
        if s.name not in reference_images:
            mask = masker(s.reference) if masker else None
            reference_images[s.name] = reference_view(s.reference, mask, reference_size, s.cls)
        return reference_images[s.name]

    def generate(method: str, gamma: float | None) -> tuple[dict[tuple[str, int, int], Path], dict]:
        files, counts = {}, {"generated": 0, "reused": 0, "replaced": 0}
        settings = SampleSettings(steps=args.steps, resolution=args.resolution, gamma=gamma or 0.0)
        jobs = [(s, i, p, n) for s in subjects for i, p in enumerate(plan[s.name]) for n in range(args.images)]
        for s, i, p, n in tqdm(jobs, desc=f"generating {method}"):
            path = out / "images" / method / s.name / f"{i:02d}_{n}.png"
            prompt = p.with_subject(s.cls) if gamma is not None else p.with_class(s.cls)
            subject = None if gamma is None else {"checkpoint": checkpoint_id, "reference": reference_ids[s.name]}
            key = generation_key(settings=dataclasses.asdict(settings), base=base_id, subject=subject,
                                 prompt=prompt, seed=args.seed + n)
            if saved_key(path) == key:   # resumable: same checkpoint, reference, prompt, seed and settings
                counts["reused"] += 1
            else:
                counts["replaced" if path.exists() else "generated"] += 1
                reference = None if gamma is None else encoder_reference(s)
                save_image(sampler(prompt, reference, settings, seed=args.seed + n), path, key)
            files[(s.name, i, n)] = path
        if counts["replaced"]:
            log.warning("%s: regenerated %d images made from another checkpoint, reference or settings",
                        method, counts["replaced"])
        return files, counts

    def segmented(path: Path) -> torch.Tensor:
        image = load_image(path)
        if masker is None:
            return image
        return crop_to_mask(image, load_view(str(path), str(masker(path)))[1][0])

    refs = {s.name: [segmented(Path(p)) for p in s.images] for s in subjects}
    ref_clip = {k: clip.images(v) for k, v in refs.items()}
    ref_dino = {k: dino.images(v) for k, v in refs.items()}

    def score_files(files) -> tuple[dict, dict]:
        return score(subjects, plan, files, args.images, clip, dino, ref_clip, ref_dino, load_image, segmented)

    report = {"protocol": dataclasses.asdict(protocol) | {
        "segmentation_used": "SAM" if masker else "none (no SAM checkpoint given)",
        "references": {s.name: s.reference for s in subjects}, "subjects": [s.name for s in subjects],
        "reference_given_to_encoder": f"as in training without augmentation: subject on gray, square crop 1.2x "
                                      f"its box, {reference_size} px",
        "models": {"checkpoint": str(args.checkpoint) if args.checkpoint else "random tiny",
                   "checkpoint_id": checkpoint_id,
                   "tiny": args.tiny, **{k: str(v) for k, v in extra.items()}},
        "versions": {"torch": torch.__version__}},
        "methods": {}, "categories": {}, "images": {}}
    points = []
    for gamma in gammas:
        name = f"CustomContrast γ={gamma:g}"
        files, report["images"][name] = generate(f"customcontrast_g{gamma:g}", gamma)
        report["methods"][name], report["categories"][name] = score_files(files)
        points.append((gamma, report["methods"][name]["CLIP-T"], report["methods"][name]["E-CI"]))
        for s in subjects:
            grid([[Path(s.reference)] + [files[(s.name, i, n)] for n in range(args.images)]
                  for i in range(len(plan[s.name]))], out / "grids" / f"{s.name}_g{gamma:g}.png")
    lower = "base model, no subject (lower bound)"
    files, report["images"][lower] = generate("base", None)
    report["methods"][lower], _ = score_files(files)
    upper = {"CLIP-T": float("nan"), "ImageReward": "absent"}
    for key, feats in (("CI", ref_clip), ("DI", ref_dino)):
        upper[f"R-{key}"] = upper[f"E-{key}"] = self_similarity(feats)
    report["methods"]["reference images (upper bound)"] = upper
    write_reports(out, report)
    scatter(points, out / "similarity_vs_controllability.png")
    log.info("report written to %s", out / "report.json")
    return out / "report.json"


if __name__ == "__main__":
    main()
