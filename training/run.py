"""``python -m training.run``: trains CustomContrast; the default is the tiny CPU preset.

Examples:
    python -m training.run                                   # tiny preset, CPU, under a minute
    python -m training.run --preset sd15 --config my.json    # real models from local paths
    python -m training.run --config my_sd15.json             # a copy of configs/sd15.json, data and paths filled in
    accelerate launch --num_processes 8 -m training.run --preset sd15 --config my.json
    torchrun --nproc_per_node 8 -m training.run --preset sd15 --config my.json
    python -m training.run --output-dir runs/tiny --resume latest
"""
from __future__ import annotations

import os

# nothing is downloaded: set before any module of this package can import huggingface_hub (it reads this once)
os.environ["HF_HUB_OFFLINE"] = "1"

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from pathlib import Path  # noqa: E402

from .config import PRESETS, TrainConfig, get_train_preset, read_config_file  # noqa: E402


PYTHON_SPELLINGS = {"True": True, "False": False, "None": None}


def _set_value(text: str):
    """A ``--set`` value: JSON (``1e-4``, ``true``, ``[2, 4]``, ``"bf16"``), Python's ``True``/``False``, or else
    the text itself as a string (``bf16``); TrainConfig then checks its type."""
    if text in PYTHON_SPELLINGS:
        return PYTHON_SPELLINGS[text]
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_config(argv: Sequence[str] | None = None) -> tuple[TrainConfig, str | None]:
    """Turns command-line flags into a frozen TrainConfig (preset, then --config JSON, then flags)."""
    parser = argparse.ArgumentParser(prog="python -m training.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="starting configuration")
    parser.add_argument("--config", type=Path, help="JSON file with TrainConfig fields overriding the preset")
    parser.add_argument("--output-dir", help="where checkpoints, logs and the exported file go")
    parser.add_argument("--steps", type=int, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, help="distinct subjects per process and step")
    parser.add_argument("--data", help="'synthetic' or a JSONL subject manifest")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--resume", help="'latest' or a checkpoint folder to continue from")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                        help="override any TrainConfig field (JSON value), e.g. --set lr=1e-4 --set augment=false")
    args = parser.parse_args(argv)
    cfg = get_train_preset(args.preset)
    overrides: dict = {}
    if args.config:
        try:
            overrides.update(read_config_file(args.config))
        except ValueError as err:   # names the file, what was expected and what was found
            parser.error(f"--config: {err}")
    for item in args.set:
        field, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects FIELD=VALUE, got {item!r}")
        overrides[field] = _set_value(value)
    for flag in ("output_dir", "steps", "batch_size", "data", "seed"):
        if getattr(args, flag) is not None:
            overrides[flag] = getattr(args, flag)
    merged = {**dataclasses.asdict(cfg), **overrides}
    if isinstance(overrides.get("paths"), dict):
        merged["paths"] = {**dataclasses.asdict(cfg.paths), **overrides["paths"]}
    try:
        return TrainConfig.from_dict(merged), args.resume
    except ValueError as err:   # a field of the wrong type or out of range: named in the message
        parser.error(str(err))


def main(argv: Sequence[str] | None = None) -> Path:
    """Runs training and returns the exported checkpoint path."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg, resume = parse_config(argv)
    from .loop import train
    path = train(cfg, resume=resume)
    logging.getLogger(__name__).info("exported %s", path)
    return path


def cli(argv: Sequence[str] | None = None) -> None:
    """``main`` for the command line: a diverged run or a failed save exits 1 with its message (the last
    good checkpoint is kept), never "exported"."""
    from .loop import TrainingDiverged
    from .state import CheckpointWriteError
    try:
        main(argv)
    except (TrainingDiverged, CheckpointWriteError) as err:
        logging.getLogger(__name__).error("%s", err)
        sys.exit(1)


if __name__ == "__main__":
    cli()
