"""``python -m training.miniworld``: the small world, trained and measured end to end on the CPU.

Stages, each cached on disk under ``--out`` and skipped when complete (so a stopped run resumes):
  world    the datasets (training scenes, multi-view subjects, held-out subjects and contexts)
  base     the base text-to-image model, trained from scratch
  scorers  the world's fidelity and controllability scorers, validated on real renders
  train    CustomContrast on the base with training.run, per variant and seed
  report   generations of every variant, the table and the picture

Examples:
    python -m training.miniworld --quick                 # every stage at toy scale (tests)
    python -m training.miniworld --out runs/miniworld    # the full run
    python -m training.miniworld --stages world,base     # only some stages
"""
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"   # nothing is downloaded

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import logging  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from .pipeline import STAGES, MiniworldConfig, run_stages  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m training.miniworld", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/miniworld"), help="where every stage writes")
    parser.add_argument("--quick", action="store_true", help="toy scale: every stage in about a minute")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, among {', '.join(STAGES)}")
    parser.add_argument("--seeds", type=int, help="CustomContrast seeds per variant")
    parser.add_argument("--reference-jitter", type=float,
                        help=f"colour jitter of the training references (default {MiniworldConfig.reference_jitter})")
    parser.add_argument("--fine-words", action="store_true",
                        help="the base model's captions also give finer colour words (WorldConfig.fine_words)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        parser.error(f"--stages: expected names among {', '.join(STAGES)}, found {', '.join(unknown)}")
    cfg = MiniworldConfig.quick() if args.quick else MiniworldConfig()
    if args.seeds is not None:
        cfg = cfg.with_seeds(args.seeds)
    if args.fine_words:
        cfg = dataclasses.replace(cfg, world=dataclasses.replace(cfg.world, fine_words=True))
    if args.reference_jitter is not None:
        cfg = dataclasses.replace(cfg, reference_jitter=args.reference_jitter)
    start = time.time()
    out = run_stages(args.out, cfg, stages)
    logging.getLogger(__name__).info("done in %.0f s: %s", time.time() - start, out)
    return out


if __name__ == "__main__":
    main()
