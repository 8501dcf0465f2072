"""Loss logging: TensorBoard scalars, a JSONL history and a loss-curve PNG."""
from __future__ import annotations

import json
import os
from pathlib import Path


class LossHistory:
    """Collects every loss term by name and writes it where people look.

    ``resume_step``: a resumed run's history starts with the rows of ``history.jsonl`` up to that step (rows
    after it, logged before an interruption, are dropped: the run trains those steps again), and TensorBoard
    hides the events after it; None starts a new history.
    """

    def __init__(self, folder: Path, *, enabled: bool = True, resume_step: int | None = None) -> None:
        self.folder, self.enabled = folder, enabled
        self.rows: list[dict[str, float]] = []
        self.writer = None
        if enabled:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / "history.jsonl"
            if resume_step is not None and path.is_file():
                rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
                self.rows = [r for r in rows if r["step"] <= resume_step]
            try:
                from torch.utils.tensorboard import SummaryWriter
                purge = None if resume_step is None else resume_step + 1
                self.writer = SummaryWriter(str(folder), purge_step=purge)
            except ImportError:   # tensorboard is optional
                self.writer = None

    def add(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.rows.append({"step": step, **values})
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(f"loss/{name}", value, step)

    def flush(self) -> None:
        if not self.enabled or not self.rows:
            return
        tmp = self.folder / ".history.jsonl.tmp"   # replaced whole: a kill while writing keeps the previous file
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        os.replace(tmp, self.folder / "history.jsonl")
        self.plot(self.folder / "loss_curve.png")
        if self.writer is not None:
            self.writer.flush()

    def plot(self, path: Path) -> None:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = [k for k in self.rows[0] if k != "step"]
        fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 2.8), squeeze=False)
        steps = [r["step"] for r in self.rows]
        for ax, name in zip(axes[0], names):
            ax.plot(steps, [r[name] for r in self.rows], lw=1.2)
            ax.set_title(name)
            ax.set_xlabel("step")
        fig.tight_layout()
        fig.savefig(path, dpi=80)
        plt.close(fig)

    def close(self) -> None:
        self.flush()
        if self.writer is not None:
            self.writer.close()
