"""``python -m training.prepare``: builds a JSONL subject manifest, optionally with SAM masks.

    python -m training.prepare folders ../shared/data/dreambench --out data/dreambench.jsonl
    python -m training.prepare mvimgnet /data/mvimgnet --out data/mv.jsonl --sam sam_vit_b.pth
    python -m training.prepare openimages masks.csv --images imgs/ --masks masks/ --out data/oi.jsonl
"""
from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from .data import (GroundingDinoBoxes, SamMasker, fill_masks, from_mvimgnet, from_openimages_csv,
                   from_subject_folders, write_manifest)


def main(argv: Sequence[str] | None = None) -> Path:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m training.prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("layout", choices=["folders", "mvimgnet", "openimages"])
    parser.add_argument("source", type=Path, help="root folder (or the OpenImages CSV)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--images", type=Path, help="OpenImages image folder")
    parser.add_argument("--masks", type=Path, help="OpenImages mask folder")
    parser.add_argument("--sam", type=Path, help="local SAM checkpoint: make masks for subjects without them")
    parser.add_argument("--sam-type", default="vit_b", choices=["vit_b", "vit_l", "vit_h"])
    parser.add_argument("--grounding-dino", type=Path, help="local GroundingDINO folder: boxes from the class word")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.layout == "folders":
        records = from_subject_folders(args.source)
    elif args.layout == "mvimgnet":
        records = from_mvimgnet(args.source)
    else:
        if not (args.images and args.masks):
            parser.error("openimages needs --images and --masks")
        records = from_openimages_csv(args.source, args.images, args.masks)
    if args.sam:
        boxes = GroundingDinoBoxes(args.grounding_dino, args.device) if args.grounding_dino else None
        records = fill_masks(records, SamMasker(args.sam, args.sam_type, args.device, args.out.parent / "masks"), boxes)
    path = write_manifest(args.out, records)
    logging.getLogger(__name__).info("%d subjects, %d images -> %s", len(records),
                                     sum(len(r.images) for r in records), path)
    return path


if __name__ == "__main__":
    main()
