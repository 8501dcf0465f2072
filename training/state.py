"""Resumable training state: written atomically so a kill during saving never loses the previous one.

Layout: ``<output>/checkpoints/step_000030/{trainable.safetensors, optimizer.pt, state.json}`` and
``<output>/checkpoints/latest`` naming the newest complete folder. A folder is written under a
temporary name and renamed when complete; ``latest`` is replaced atomically afterwards. Temporary names
left by a kill are removed when the run starts again; a ``latest`` whose files are truncated or damaged
is passed over for the previous complete step, with a warning.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

log = logging.getLogger(__name__)
LATEST = "latest"
TMP_SUFFIX = ".tmp"   # every temporary name written here ends so; a kill leaves them for remove_unfinished


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


class CheckpointWriteError(OSError):
    """A checkpoint (or the run's history or export) could not be written; the message names the path, the
    cause and the checkpoint that is kept."""


def umask() -> int:
    """The process's umask, read without changing it where the platform shows it (Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_failure(path: Path, err: BaseException) -> str:
    """Why writing ``path`` failed, in words: a full disk (ENOSPC, or torch's zip writer's "unexpected pos")
    is named as such."""
    full = (isinstance(err, OSError) and err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))) \
        or "unexpected pos" in str(err) or "No space left" in str(err)
    return f"could not write {path}: {'the disk is full' if full else 'the write failed'} ({type(err).__name__}: {err})"


def _pointed(root: Path) -> Path | None:
    """The folder ``latest`` names, or None."""
    pointer = root / LATEST
    try:
        name = pointer.read_text().strip() if pointer.is_file() else ""
    except (OSError, UnicodeDecodeError):
        return None
    return root / name if name.startswith("step_") and "/" not in name else None


def kept_checkpoint(root: Path) -> str:
    """The checkpoint a failed write leaves in place, in words."""
    previous = _pointed(root)
    if previous is not None and previous.is_dir():
        return f"the previous checkpoint {previous} is kept"
    return "no earlier checkpoint exists"


def write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~umask())   # mkstemp makes 0600 whatever the umask
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_state(root: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: TrainingState,
               *, keep: int = 2) -> Path:
    """Writes one complete checkpoint folder, then points ``latest`` at it; keeps the newest ``keep``.

    Folders and files follow the umask (0o755 / 0o644 under 022). A failed write (a full disk) raises
    CheckpointWriteError naming the file; the temporary folder is removed and the previous checkpoint kept.
    """
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{state.step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=TMP_SUFFIX, dir=root))
    target, mask = tmp, umask()
    try:
        os.chmod(tmp, 0o777 & ~mask)   # mkdtemp makes 0700 (and safetensors 0600) whatever the umask
        target = tmp / "trainable.safetensors"
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(target))
        target = tmp / "optimizer.pt"
        torch.save({"optimizer": optimizer.state_dict(), "generator": state.generator_state}, target)
        target = tmp / "state.json"
        target.write_text(json.dumps({"step": state.step, "epoch": state.epoch, "batch": state.batch,
                                      "micro_batches": state.micro_batches, "processes": state.processes}))
        for file in tmp.iterdir():
            os.chmod(file, 0o666 & ~mask)
        target = final
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except (OSError, RuntimeError) as err:   # torch's zip writer reports a full disk as a RuntimeError
        raise CheckpointWriteError(f"{write_failure(target, err)}; the checkpoint {final.name} (step "
                                   f"{state.step}) was not saved and {kept_checkpoint(root)}") from err
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_text_atomic(root / LATEST, final.name)
    except OSError as err:
        raise CheckpointWriteError(f"{write_failure(root / LATEST, err)}; {final} is complete, but "
                                   f"{root / LATEST} still names {_pointed(root)}") from err
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep]:
        shutil.rmtree(old)
    return final


def incomplete(folder: Path) -> str | None:
    """Why ``folder`` is not a complete, readable training checkpoint (a missing, truncated or damaged
    file), or None when it is one. Reads headers only."""
    try:
        info = json.loads((folder / "state.json").read_text())
        if not isinstance(info, dict) or not isinstance(info.get("step"), int):
            return f"{folder / 'state.json'}: expected a JSON object with an integer step, found {info!r:.100}"
    except FileNotFoundError:
        return f"{folder / 'state.json'} is missing"
    except (OSError, ValueError) as err:
        return f"{folder / 'state.json'} cannot be read ({err})"
    weights = folder / "trainable.safetensors"
    try:
        with safe_open(str(weights), framework="pt"):
            pass
    except Exception as err:   # safetensors' own error type: a truncated file, a damaged header
        return f"{weights} is missing or damaged ({err})"
    if not zipfile.is_zipfile(folder / "optimizer.pt"):   # torch.save's zip; a truncated one has no directory
        return f"{folder / 'optimizer.pt'} is missing or truncated"
    return None


def find_checkpoint(root: Path, which: str) -> Path | None:
    """Resolves ``latest`` (or a folder name/path) to a complete checkpoint folder; None when there is none.

    ``latest``: the folder the ``latest`` file names; when that one is incomplete or damaged (a truncated
    file), the newest complete ``step_*`` folder, with a warning naming the damaged path. A folder given by
    name must be complete (FileNotFoundError / ValueError naming it otherwise).
    """
    if which != LATEST:
        path = Path(which) if Path(which).is_absolute() else root / which
        if not (path / "state.json").is_file():
            raise FileNotFoundError(f"no complete training checkpoint at {path} (expected state.json inside)")
        reason = incomplete(path)
        if reason:
            raise ValueError(f"training checkpoint {path} is incomplete or damaged: {reason}; resume from another "
                             "step_* folder or with --resume latest")
        return path
    pointed = _pointed(root)
    folders = sorted((p for p in root.glob("step_*") if p.is_dir()), reverse=True)
    candidates = ([pointed] if pointed in folders else []) + [p for p in folders if p != pointed]
    for folder in candidates:
        reason = incomplete(folder)
        if reason is None:
            return folder
        if (folder / "state.json").is_file():   # a folder without state.json was never complete: no warning
            log.warning("checkpoint %s is incomplete or damaged (%s); trying the previous complete step", folder,
                        reason)
    return None


def remove_unfinished(out: Path, export_name: str) -> list[Path]:
    """Removes the temporary files and folders that saves interrupted by a kill left in the run folder
    ``out`` (only the names this package writes); returns them."""
    patterns = ((out / "checkpoints", f".step_*{TMP_SUFFIX}"), (out / "checkpoints", f".{LATEST}.*"),
                (out, f".{export_name}.*{TMP_SUFFIX}"), (out / "logs", f".history.jsonl{TMP_SUFFIX}"),
                (out / "data", ".manifest.jsonl.*"))
    removed = [p for folder, pattern in patterns for p in sorted(folder.glob(pattern))]
    for path in removed:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return removed


def load_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> TrainingState:
    """Restores weights and optimizer state in place; returns where the run stopped."""
    try:
        weights = load_file(str(path / "trainable.safetensors"))
        extra = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        info = json.loads((path / "state.json").read_text())
    except Exception as err:   # safetensors, torch and json raise their own types for damaged files
        raise ValueError(f"training checkpoint {path} cannot be read: {type(err).__name__}: {err}") from None
    model.load_state_dict(weights)
    optimizer.load_state_dict(extra["optimizer"])
    return TrainingState(step=int(info["step"]), epoch=int(info["epoch"]), generator_state=extra["generator"],
                         batch=int(info["batch"]) if "batch" in info else None,
                         micro_batches=int(info.get("micro_batches", 0)), processes=int(info.get("processes", 1)))
