"""The small world's stages and their configuration: world -> base -> scorers -> train -> report."""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from customcontrast_core.config import get_preset

from ..config import TrainConfig
from .base import BaseConfig, Cycle, train_base
from .data import WorldConfig, read_scenes, write_world

log = logging.getLogger(__name__)
STAGES = ("world", "base", "scorers", "train", "report")


@dataclass(frozen=True)
class Variant:
    """One trained CustomContrast variant: the TrainConfig fields it changes."""

    name: str
    overrides: tuple[tuple[str, object], ...] = ()
    all_seeds: bool = True      # False: trained on the first seed only


# the ablations of Eq. 9 (paper Table 4); inference-time variants live in the report. The paper's central
# comparison (full vs lambda1 = 0) runs on every seed; each contrastive term alone on the first seed only,
# which keeps the whole train stage near 35 minutes on two cores.
TRAINED_VARIANTS = (
    Variant("full"),
    Variant("no_contrast", (("contrastive_terms", ()),)),   # lambda1 = 0
    Variant("cscl_only", (("contrastive_terms", ("cscl",)),), all_seeds=False),
    Variant("macl_only", (("contrastive_terms", ("macl",)),), all_seeds=False),
)


@dataclass(frozen=True)
class MiniworldConfig:
    """Everything the small world's run depends on."""

    encoder_preset: str = "tiny"        # CustomContrast's preset; the base model has its UNet and text widths
    world: WorldConfig = WorldConfig()
    base: BaseConfig = BaseConfig()
    train_steps: int = 1000
    train_batch: int = 16
    train_lr: float = 2e-3
    reference_jitter: float = 0.0       # TrainConfig.reference_jitter of every run (0.1: docs/miniworld.md)
    seeds: tuple[int, ...] = (0, 1, 2)
    variants: tuple[Variant, ...] = TRAINED_VARIANTS
    sample_steps: int = 20
    guidance: float = 4.0
    scorer_quick: bool = False
    workers: int = 2                    # CustomContrast runs trained at once, one torch thread each
    extra: dict = field(default_factory=dict)

    @classmethod
    def quick(cls) -> "MiniworldConfig":
        """Toy scale: every stage runs, nothing is expected to be learned (the tests' mode)."""
        return cls(world=WorldConfig(scenes=256, subjects=8, views=3, eval_subjects=2, eval_prompts=1,
                                     eval_renders=1),
                   base=BaseConfig(vae_steps=5, steps=5, batch_size=8, warmup=2,
                                   restarts=(Cycle(2, 1e-4, min_snr=5.0, ema=0.9),), restart_warmup=1),
                   train_steps=3, train_batch=4, seeds=(0,), variants=TRAINED_VARIANTS[:2], sample_steps=2,
                   scorer_quick=True, workers=1)

    def with_seeds(self, n: int) -> "MiniworldConfig":
        return dataclasses.replace(self, seeds=tuple(range(n)))

    def train_config(self, out: Path, variant: Variant, seed: int) -> TrainConfig:
        """The TrainConfig of one CustomContrast run on the world (the real ``training.run`` path)."""
        fields = dict(encoder_preset=self.encoder_preset, tiny_models=True, tiny_weights=str(out / "base"),
                      data=str(out / "world" / "subjects" / "manifest.jsonl"), hflip=False,
                      output_dir=str(out / "runs" / f"{variant.name}_seed{seed}"), steps=self.train_steps,
                      batch_size=self.train_batch, lr=self.train_lr, target_size=self.world.image_size,
                      reference_size=self.world.image_size, reference_jitter=self.reference_jitter,
                      save_every=self.train_steps, seed=seed,
                      warmup_steps=min(50, self.train_steps // 4))
        fields.update(dict(variant.overrides))
        return TrainConfig.from_dict(fields)


def _train_one(tc: TrainConfig, threads: int | None = 1) -> None:
    """One CustomContrast run (in a worker process: one torch thread, so two runs share two cores)."""
    import torch

    from ..loop import train
    if threads is not None:
        torch.set_num_threads(threads)
    log.info("training %s", tc.output_dir)
    train(tc)


RELEASE_FILES = ("base/vae.safetensors", "base/unet.safetensors", "base/text.safetensors",
                 "base/clip_vision.safetensors", "base/appearance.safetensors", "scorers/scorers.safetensors")


def release(out: Path, cfg: MiniworldConfig) -> Path:
    """Copies the base model, the first seed's full CustomContrast and the scorers into ``out/release`` with
    their numbers (``numbers.json``: that seed's report rows), the files the learned-behaviour tests read."""
    import shutil
    folder = out / "release"
    (folder / "base").mkdir(parents=True, exist_ok=True)
    (folder / "scorers").mkdir(exist_ok=True)
    for name in RELEASE_FILES:
        shutil.copyfile(out / name, folder / name)
    seed = cfg.seeds[0]
    shutil.copyfile(out / "runs" / f"full_seed{seed}" / "customcontrast.safetensors",
                    folder / "customcontrast.safetensors")
    results = json.loads((out / "report" / "results.json").read_text())
    numbers = {"seed": seed, "world": dataclasses.asdict(cfg.world), "train_steps": cfg.train_steps,
               "rows": {name: runs[0] for name, runs in results.items()}}
    (folder / "numbers.json").write_text(json.dumps(numbers, indent=1))
    return folder


def run_stages(out: str | Path, cfg: MiniworldConfig, stages: list[str]) -> Path:
    """Runs ``stages`` in order; each skips what is already on disk. Returns the report folder."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if "world" in stages:
        write_world(out / "world", cfg.world)
    if "base" in stages:
        images, captions = read_scenes(out / "world" / "scenes.npz")
        train_base(out / "base", images, captions, cfg.base, get_preset(cfg.encoder_preset))
    if "scorers" in stages:
        from .scorers import train_scorers
        train_scorers(out / "scorers", seed=cfg.world.seed, quick=cfg.scorer_quick)
    if "train" in stages:
        todo = [cfg.train_config(out, v, seed) for seed in cfg.seeds for v in cfg.variants   # seed 0 first
                if v.all_seeds or seed == cfg.seeds[0]]
        todo = [tc for tc in todo if not (Path(tc.output_dir) / "customcontrast.safetensors").is_file()]
        if cfg.workers > 1 and len(todo) > 1:
            import multiprocessing
            with multiprocessing.get_context("spawn").Pool(cfg.workers, maxtasksperchild=1) as pool:
                pool.map(_train_one, todo, chunksize=1)
        else:
            for tc in todo:
                _train_one(tc, threads=None)
    if "report" in stages:
        from .report import write_report
        write_report(out, cfg)
        release(out, cfg)
    (out / "miniworld.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1, default=str))
    return out / "report"
