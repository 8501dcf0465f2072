"""``python -m training.miniworld --quick``: every stage runs through the real training path, writes what the
report needs, and a second run reuses every cached stage instead of training again."""
from __future__ import annotations

import json

import numpy as np
from PIL import Image

from training.miniworld.pipeline import STAGES, MiniworldConfig, run_stages
from training.miniworld.report import AUTOENCODED, GENERATORS, UPPER


def test_quick_run_writes_every_stage_and_a_second_run_reuses_them(tmp_path) -> None:
    cfg = MiniworldConfig.quick()
    report = run_stages(tmp_path, cfg, list(STAGES))

    base = sorted(p.name for p in (tmp_path / "base").glob("*.safetensors"))
    assert base == ["appearance.safetensors", "clip_vision.safetensors", "text.safetensors", "unet.safetensors",
                    "vae.safetensors"]
    runs = {v.name: tmp_path / "runs" / f"{v.name}_seed0" / "customcontrast.safetensors" for v in cfg.variants}
    assert all(p.is_file() for p in runs.values())
    # the run trained on the world's data with the base model: its config says so
    train_config = json.loads((tmp_path / "runs" / "full_seed0" / "config.json").read_text())
    assert train_config["tiny_weights"] == str(tmp_path / "base") and train_config["hflip"] is False
    assert train_config["data"].endswith("subjects/manifest.jsonl") and train_config["target_size"] == 32

    results = json.loads((report / "results.json").read_text())
    trained = {v.name for v in cfg.variants}
    expected = {UPPER, AUTOENCODED} | {g.name for g in GENERATORS if g.trained is None or g.trained in trained}
    assert set(results) == expected
    for name, runs_of_variant in results.items():
        assert all(0.0 <= r["E-text_acc"] <= 1.0 and -1.0 <= r["R-appearance"] <= 1.0 for r in runs_of_variant)
    table = (report / "table.md").read_text().splitlines()
    assert len(table) == 2 + len(expected)
    columns = json.loads((report / "picture.json").read_text())
    picture = np.asarray(Image.open(report / "picture.png"))
    rows = 1 + cfg.world.eval_prompts                               # R- prompt + editing prompts
    assert picture.shape == (rows * 34 * 3, len(columns["columns"]) * 34 * 3, 3)

    stamps = {p: p.stat().st_mtime_ns for p in [*runs.values(), tmp_path / "base" / "unet.safetensors",
                                                tmp_path / "scorers" / "scorers.safetensors"]}
    run_stages(tmp_path, cfg, ["world", "base", "scorers", "train"])
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_tiny_models_use_sd15s_schedule_and_never_clip_the_predicted_latents() -> None:
    """diffusers' DDPM default clips x0 to [-1, 1] at every DDIM step: every tiny generation came out grey."""
    from diffusers import DDIMScheduler

    from customcontrast_core.config import get_preset
    from training.models import build_tiny

    config = build_tiny(get_preset("tiny"), image_size=32, reference_size=32).scheduler.config
    assert (config.beta_schedule, config.beta_start, config.beta_end, config.prediction_type) == \
        ("scaled_linear", 0.00085, 0.012, "epsilon")
    ddim = DDIMScheduler.from_config(config)
    ddim.set_timesteps(10)
    import torch
    latents = torch.full((1, 4, 2, 2), 3.0)     # latents of std 1 reach 3: x0 must come back as it is
    t = ddim.timesteps[-1]
    alpha = ddim.alphas_cumprod[t]
    sample = alpha.sqrt() * latents            # noise prediction 0: x0 = sample / sqrt(alpha) = 3
    out = ddim.step(torch.zeros_like(latents), t, sample).pred_original_sample
    assert torch.allclose(out, latents, atol=1e-4)
