"""``python -m training.export``: writes the file the ComfyUI nodes load from a training checkpoint.

    python -m training.export runs/tiny                       # newest checkpoint of that run
    python -m training.export runs/tiny --checkpoint step_000030 --out my_subject_model.safetensors
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from safetensors.torch import load_file

from customcontrast_core import checkpoint
from customcontrast_core.config import get_preset
from customcontrast_core.visual_kv import CustomContrastModel

from .config import TrainConfig
from .state import find_checkpoint


def export(run_dir: Path, *, which: str = "latest", out: Path | None = None) -> Path:
    """Converts a training checkpoint of ``run_dir`` into one CustomContrast ``.safetensors``."""
    config_file = run_dir / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{run_dir} is not a training run folder: expected {config_file}")
    cfg = TrainConfig.from_dict(json.loads(config_file.read_text()))
    folder = find_checkpoint(run_dir / "checkpoints", which)
    if folder is None:
        raise FileNotFoundError(f"no complete checkpoint under {run_dir / 'checkpoints'}")
    model = CustomContrastModel(get_preset(cfg.encoder_preset))
    model.load_state_dict(load_file(str(folder / "trainable.safetensors")))
    step = json.loads((folder / "state.json").read_text())["step"]
    return checkpoint.save(out or run_dir / f"customcontrast_step{step}.safetensors", model, step=step,
                           extra={"train_config": cfg.to_json()})


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m training.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--checkpoint", default="latest")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    path = export(args.run_dir, which=args.checkpoint, out=args.out)
    print(path)
    return path


if __name__ == "__main__":
    main()
