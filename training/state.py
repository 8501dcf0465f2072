"""Resumable training state: written atomically so a kill during saving never loses the previous one.

Layout: ``<output>/checkpoints/step_000030/{trainable.safetensors, optimizer.pt, state.json}`` and
``<output>/checkpoints/latest`` naming the newest complete folder. A folder is written under a
temporary name and renamed when complete; ``latest`` is replaced atomically afterwards.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

LATEST = "latest"


@dataclass(frozen=True)
class TrainingState:
    """Where a run stopped: optimizer steps taken and the position of the next global micro-batch.

    ``epoch``/``batch``: the epoch and the index within it of the next global batch to train on (a resumed run
    starts there); ``micro_batches``: global micro-batches consumed so far (``step * grad_accum``);
    ``processes``: how many processes cut the global batches. ``batch`` is None in a checkpoint written before
    it was recorded (there ``epoch`` is the epoch of the last batch trained on).
    """

    step: int
    epoch: int
    generator_state: torch.Tensor
    batch: int | None = 0
    micro_batches: int = 0
    processes: int = 1


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def save_state(root: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: TrainingState,
               *, keep: int = 2) -> Path:
    """Writes one complete checkpoint folder, then points ``latest`` at it; keeps the newest ``keep``."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{state.step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=root))
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                  str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "generator": state.generator_state}, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": state.step, "epoch": state.epoch, "batch": state.batch,
                                                    "micro_batches": state.micro_batches,
                                                    "processes": state.processes}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    _write_text_atomic(root / LATEST, final.name)
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep]:
        shutil.rmtree(old)
    return final


def find_checkpoint(root: Path, which: str) -> Path | None:
    """Resolves ``latest`` (or a folder name/path) to a complete checkpoint folder; None when there is none."""
    if which != LATEST:
        path = Path(which) if Path(which).is_absolute() else root / which
        if not (path / "state.json").is_file():
            raise FileNotFoundError(f"no complete training checkpoint at {path} (expected state.json inside)")
        return path
    pointer = root / LATEST
    if pointer.is_file() and (root / pointer.read_text().strip() / "state.json").is_file():
        return root / pointer.read_text().strip()
    complete = sorted(p for p in root.glob("step_*") if (p / "state.json").is_file())
    return complete[-1] if complete else None


def load_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> TrainingState:
    """Restores weights and optimizer state in place; returns where the run stopped."""
    model.load_state_dict(load_file(str(path / "trainable.safetensors")))
    extra = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(extra["optimizer"])
    info = json.loads((path / "state.json").read_text())
    return TrainingState(step=int(info["step"]), epoch=int(info["epoch"]), generator_state=extra["generator"],
                         batch=int(info["batch"]) if "batch" in info else None,
                         micro_batches=int(info.get("micro_batches", 0)), processes=int(info.get("processes", 1)))
