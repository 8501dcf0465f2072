"""Sample grids during training: fixed prompts and seeds on one fixed reference subject of the training data,
made by the evaluation's sampler (``training.eval.generate.SubjectSampler``: DDIM, classifier-free guidance, S+
per timestep, mask propagation), written to ``<output_dir>/samples/step_000030.png``.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .config import TrainConfig
from .data.manifest import SubjectRecord
from .eval.generate import SampleSettings, SubjectSampler, reference_view
from .eval.report import save_image


@contextmanager
def evaluation_mode(unet: nn.Module, model: nn.Module) -> Iterator[None]:
    """Lets a sampler install its own attention processors and put ``model`` in eval mode; puts the training
    processors and mode back afterwards (also when sampling fails)."""
    processors, training = unet.attn_processors, model.training
    try:
        yield
    finally:
        unet.set_attn_processor(processors)
        model.train(training)


class TrainingSamples:
    """The sample grid of a run: one row per prompt of ``cfg.sample_prompts`` (``{cls}`` replaced by the subject's
    class word), the reference in the first column, then one image per seed of ``cfg.sample_seeds``.

    ``record``: the reference subject (its first image and mask, built as the evaluation builds references).
    """

    def __init__(self, cfg: TrainConfig, record: SubjectRecord, folder: Path) -> None:
        self.cfg, self.folder, self.subject = cfg, folder, record.subject
        mask = record.masks[0] if record.masks else None
        self.reference = reference_view(record.images[0], mask, cfg.reference_size, record.cls)   # (3, r, r)
        self.prompts = tuple(p.replace("{cls}", record.cls) for p in cfg.sample_prompts)
        self.settings = SampleSettings(steps=cfg.sample_steps, guidance=cfg.sample_guidance,
                                       resolution=cfg.target_size)

    def images(self, frozen, model: nn.Module) -> Tensor:
        """Shapes: -> (P, S, 3, R, R) in [0, 1], P prompts, S seeds, R = target_size."""
        with evaluation_mode(frozen.unet, model):
            sampler = SubjectSampler(frozen, model)
            return torch.stack([torch.stack([sampler(prompt, self.reference, self.settings, seed)
                                             for seed in self.cfg.sample_seeds]) for prompt in self.prompts])

    def grid(self, images: Tensor) -> Tensor:
        """Shapes: images (P, S, 3, R, R) -> (3, P*R, (S+1)*R), the reference resized to R in the first column."""
        p, _, _, r, _ = images.shape
        ref = F.interpolate(self.reference[None].float(), size=(r, r), mode="bilinear", align_corners=False,
                            antialias=True).clamp(0, 1)
        cells = torch.cat([ref.expand(p, -1, -1, -1)[:, None], images.float()], dim=1)
        return rearrange(cells, "p s c h w -> c (p h) (s w)")

    def __call__(self, frozen, model: nn.Module, step: int) -> tuple[Path, Tensor]:
        """Writes the grid of ``step``; returns its path and the grid (3, H, W) in [0, 1]."""
        grid = self.grid(self.images(frozen, model))
        path = self.folder / f"step_{step:06d}.png"
        save_image(grid, path)
        return path, grid
