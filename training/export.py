"""``python -m training.export``: writes the file the ComfyUI nodes load from a training checkpoint.

    python -m training.export runs/tiny                       # newest checkpoint of that run
    python -m training.export runs/tiny --checkpoint step_000030 --out my_subject_model.safetensors
    python -m training.export runs/sd15 --dtype fp16     # half the bytes; ComfyUI casts to the UNet's dtype
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from customcontrast_core import checkpoint
from customcontrast_core.config import get_preset
from customcontrast_core.safetensors_file import read_tensors
from customcontrast_core.visual_kv import CustomContrastModel

from .config import TrainConfig
from .models import clip_vision_record
from .state import find_checkpoint


def _read_json(path: Path, what: str) -> object:
    """A JSON file of the run, or an error naming it (missing or malformed)."""
    if not path.is_file():
        raise FileNotFoundError(f"{what}: expected {path}, found no such file")
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{what}: {path} is not valid JSON ({err})") from None


def _step(folder: Path) -> int:
    state = _read_json(folder / "state.json", "training checkpoint state")
    step = state.get("step") if isinstance(state, dict) else None
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"{folder / 'state.json'}: expected an object with a non-negative integer step, "
                         f"found {state!r:.200}")
    return step


def _output_path(out: Path) -> Path:
    if out.is_dir() or out.suffix != ".safetensors":
        raise ValueError(f"--out: expected a file path ending in .safetensors (the Load node lists those), found {out}"
                         + (" (a folder)" if out.is_dir() else ""))
    return out


def export(run_dir: Path, *, which: str = "latest", out: Path | None = None, dtype: str = "fp32") -> Path:
    """Converts a training checkpoint of ``run_dir`` into one CustomContrast ``.safetensors``, its weights
    stored in ``dtype`` ("fp32", "fp16" or "bf16", recorded in the metadata; fp16/bf16 halve the file).

    The file is written atomically (nothing appears under its name until it is complete) and follows the
    umask; a malformed or incomplete training checkpoint is refused naming the file.
    """
    out = _output_path(Path(out)) if out is not None else None
    torch_dtype = checkpoint.dtype_named(dtype, "--dtype")
    config_file = run_dir / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{run_dir} is not a training run folder: expected {config_file}")
    cfg = TrainConfig.from_dict(_read_json(config_file, "training run config"))
    folder = find_checkpoint(run_dir / "checkpoints", which)
    if folder is None:
        raise FileNotFoundError(f"no complete checkpoint under {run_dir / 'checkpoints'}")
    step = _step(folder)
    weights = folder / "trainable.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"incomplete training checkpoint {folder}: expected {weights}, found no such file")
    config = get_preset(cfg.encoder_preset)
    checkpoint.check_matches(weights, config, f"the run's encoder preset {cfg.encoder_preset!r}")
    model = CustomContrastModel(config)
    model.load_state_dict(read_tensors(weights))
    return checkpoint.save(out or run_dir / f"customcontrast_step{step}.safetensors", model, step=step,
                           extra={"train_config": cfg.to_json()}, dtype=torch_dtype,
                           clip_vision=clip_vision_record(cfg, config))


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m training.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--checkpoint", default="latest")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--dtype", choices=sorted(checkpoint.DTYPES), default="fp32",
                        help="dtype of the written weights (fp16 and bf16 halve the file; the ComfyUI nodes cast "
                             "them to the dtype the UNet runs in)")
    args = parser.parse_args(argv)
    path = export(args.run_dir, which=args.checkpoint, out=args.out, dtype=args.dtype)
    print(path)
    return path


if __name__ == "__main__":
    main()
