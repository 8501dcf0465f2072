"""Loss logging: TensorBoard scalars and sample grids, a JSONL history and a loss-curve PNG."""
from __future__ import annotations

import json
import os
from pathlib import Path


class LossHistory:
    """Collects every loss term by name and writes it where people look.

    ``history.jsonl`` keeps every step; TensorBoard gets, every ``log_every`` steps, the mean of the steps since
    the previous log (computed from the rows, so a resumed run logs the same means as an uninterrupted one).
    ``resume_step``: a resumed run's history starts with the rows of ``history.jsonl`` up to that step (rows
    after it, logged before an interruption, are dropped: the run trains those steps again), and TensorBoard
    hides the events after it; None starts a new history.
    """

    def __init__(self, folder: Path, *, enabled: bool = True, resume_step: int | None = None,
                 log_every: int = 1) -> None:
        if log_every < 1:
            raise ValueError(f"LossHistory log_every: expected a positive integer, found {log_every!r}")
        self.folder, self.enabled, self.log_every = folder, enabled, log_every
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

    def add(self, step: int, values: dict[str, float], *, last: bool = False,
            scalars: dict[str, float] | None = None) -> dict[str, float] | None:
        """Records one step. At a multiple of ``log_every`` (or the ``last`` step) returns the mean of each value over
        the steps since the previous multiple and writes it to TensorBoard (``loss/<name>``, with ``scalars`` as
        ``train/<name>``); None between logs."""
        if not self.enabled:
            return None
        self.rows.append({"step": step, **values})
        if step % self.log_every and not last:
            return None
        start = (step - 1) // self.log_every * self.log_every      # the previous log's step
        window = []
        for row in reversed(self.rows):                             # rows are in step order: read the tail only
            if row["step"] <= start:
                break
            window.append(row)
        means = {name: sum(r[name] for r in window) / len(window) for name in values}
        if self.writer is not None:
            for name, value in means.items():
                self.writer.add_scalar(f"loss/{name}", value, step)
            for name, value in (scalars or {}).items():
                self.writer.add_scalar(f"train/{name}", value, step)
        return means

    def add_image(self, tag: str, image, step: int) -> None:
        """An image in TensorBoard (when it is installed). Shapes: image (3, H, W) in [0, 1]."""
        if self.enabled and self.writer is not None:
            self.writer.add_image(tag, image, step)

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
