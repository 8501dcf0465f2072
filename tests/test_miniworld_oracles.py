"""The per-subject oracles (``training.miniworld.oracles``) on the quick world: each fit lowers its own loss on the
reference scene through the path it claims to fit, leaves the models it started from untouched, and the sampler
really generates from the fitted features.

Faults each test must catch (checked by hand):
- ``fit_unet`` fine-tuning ``frozen.unet`` itself instead of a copy (the base changes for every later row);
- ``fit_shared_adapter`` fitting only the first subject (the others' features never move);
- ``fit_adapter`` fitting ``model`` in place, or leaving the visual K/V out of its optimizer (the fitted
  features through the start model's K/V then do as well as the fit: on the quick world the fit takes the loss
  0.851 -> 0.677, the fitted features alone 0.849);
- ``SubjectSampler`` ignoring ``image`` (the fitted features would never reach a generation);
- ``write_held_out_manifest`` pairing a view with another view's mask or caption, or rendering scenes other
  than the evaluation's (the memorized oracle would train on something else than the scenes it is scored on);
- the memorized oracle training on the world's training subjects instead of that manifest.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from customcontrast_core import checkpoint
from customcontrast_core.config import get_preset
from training.eval.generate import SampleSettings, SubjectSampler, reference_view
from training.miniworld.base import load_base
from training.data.manifest import read_manifest
from training.miniworld.data import (REFERENCE_CONTEXT, held_out_subject, read_eval, subject_caption,
                                     write_held_out_manifest)
from training.miniworld.report import _load
from training.miniworld.oracles import (OracleConfig, adapter_loss, class_word_context, fit_adapter, fit_shared_adapter,
                                        fit_unet, placeholder_tokens, reference_features, reference_latents,
                                        run_oracles, unet_loss)
from training.miniworld.pipeline import MiniworldConfig, run_stages
from training.processors import ProcessorState, install_processors

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("miniworld")
    cfg = MiniworldConfig.quick()
    run_stages(out, cfg, ["world", "base", "scorers", "train"])
    size = cfg.world.image_size
    frozen = load_base(out / "base", get_preset(cfg.encoder_preset), size, size)
    model, _ = checkpoint.load(out / "runs" / "full_seed0" / "customcontrast.safetensors")
    return out, cfg, frozen, model, read_eval(out / "world" / "eval")[0]


def _weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _unet_loss(unet, frozen, case) -> float:
    """The epsilon MSE of ``unet`` on 16 fixed noise draws of ``case``'s reference scene, class-word caption."""
    with torch.no_grad():
        return unet_loss(unet, frozen, reference_latents(frozen, case), class_word_context(frozen, case), 16,
                         torch.Generator().manual_seed(7)).item()


def test_dreambooth_fit_lowers_the_reference_loss_of_a_copy(world) -> None:
    _, _, frozen, _, case = world
    base = _weights(frozen.unet)
    before = _unet_loss(frozen.unet, frozen, case)
    after = _unet_loss(fit_unet(frozen, case, OracleConfig(steps=30, unet_lr=1e-3)), frozen, case)
    assert after < 0.8 * before, (before, after)
    assert _same(_weights(frozen.unet), base)          # the base UNet itself is untouched


def test_cross_attention_fit_moves_only_the_cross_attention_weights(world) -> None:
    _, _, frozen, _, case = world
    base = _weights(frozen.unet)
    tuned = fit_unet(frozen, case, OracleConfig(steps=30, cross_attention_lr=1e-2), cross_attention_only=True)
    before, after = _unet_loss(frozen.unet, frozen, case), _unet_loss(tuned, frozen, case)
    assert after < 0.9 * before, (before, after)
    weights = _weights(tuned)
    moved = {k for k in base if not torch.equal(weights[k], base[k])}
    attn2 = {k for k in base if ".attn2." in k}
    assert len(attn2) == 16 * 5                        # to_q, to_k, to_v, to_out weight and bias in 16 layers
    assert moved == attn2                              # every cross-attention weight moves, nothing else does
    assert _same(_weights(frozen.unet), base)


def _adapter_loss(model, image, frozen, case) -> float:
    state = ProcessorState()
    processors = frozen.unet.attn_processors
    install_processors(frozen.unet, model, state, capture_downsample=())
    try:
        with torch.no_grad():
            return adapter_loss(model, image, frozen, reference_latents(frozen, case), placeholder_tokens(frozen, case, 16),
                                state, torch.Generator().manual_seed(7)).item()
    finally:
        frozen.unet.set_attn_processor(processors)


def test_adapter_fit_lowers_the_reference_loss_through_the_fitted_visual_kv(world) -> None:
    out, cfg, frozen, model, case = world
    start = _weights(model)
    size = cfg.world.image_size
    features = reference_features(model, frozen, case, size)
    before = _adapter_loss(model, features, frozen, case)
    fitted, image = fit_adapter(model, frozen, case, OracleConfig(steps=60, feature_lr=5e-2, kv_lr=3e-2), size)
    after = _adapter_loss(fitted, image, frozen, case)
    assert after < 0.9 * before, (before, after)
    assert _same(_weights(model), start)               # the trained model is untouched
    # the fitted visual K/V matter: the fitted features through the start model's K/V lose part of the gain
    assert _adapter_loss(model, image, frozen, case) > after + 0.1 * (before - after)
    assert not torch.equal(image.visual, features.visual)


def test_shared_adapter_fits_each_subjects_own_features_through_one_set_of_kv(world) -> None:
    out, cfg, frozen, model, _ = world
    cases = read_eval(out / "world" / "eval")           # the quick world's 2 held-out subjects
    start = _weights(model)
    size = cfg.world.image_size
    starts = [reference_features(model, frozen, case, size) for case in cases]
    before = [_adapter_loss(model, features, frozen, case) for features, case in zip(starts, cases)]
    fitted, images = fit_shared_adapter(model, frozen, cases, OracleConfig(steps=60, feature_lr=5e-2, kv_lr=3e-2), size)
    after = [_adapter_loss(fitted, image, frozen, case) for image, case in zip(images, cases)]
    assert all(a < 0.9 * b for a, b in zip(after, before)), (before, after)     # every subject's loss falls
    assert all(not torch.equal(image.visual, features.visual) for image, features in zip(images, starts))
    assert not torch.equal(images[0].visual, images[1].visual)                 # each its own features
    assert _same(_weights(model), start)


def test_the_sampler_generates_from_given_image_features(world) -> None:
    _, cfg, frozen, model, case = world
    size = cfg.world.image_size
    reference = reference_view(case.reference, case.reference_mask, size, case.subject.shape)
    features = reference_features(model, frozen, case, size)
    sampler = SubjectSampler(frozen, model)
    settings = SampleSettings(steps=3, guidance=4.0, resolution=size)
    prompt = "a large <subject> star at the centre on a gray background"
    encoded = sampler(prompt, reference, settings, seed=0)
    given = sampler(prompt, reference, settings, seed=0, image=features)
    torch.testing.assert_close(given, encoded, rtol=0, atol=1e-6)        # the same features: the same image
    other = type(features)(features.features * 0, features.visual.flip(-1) * 3, features.visual_cls)
    assert (sampler(prompt, reference, settings, seed=0, image=other) - encoded).abs().max() > 1e-3


def test_held_out_manifest_holds_the_evaluation_scenes_with_their_own_masks_and_captions(world, tmp_path) -> None:
    out, cfg, _, _, _ = world
    cases = read_eval(out / "world" / "eval")
    records = read_manifest(write_held_out_manifest(tmp_path, cfg.world, len(cases)))
    assert [r.subject for r in records] == [c.name for c in cases]
    for record, case in zip(records, cases):
        scenes = [(REFERENCE_CONTEXT, case.reference)] + [(ctx, path) for ctx, row in zip(case.contexts, case.renders)
                                                          for path in row]
        assert len(record.images) == len(record.masks) == len(record.captions) == len(scenes)
        for view, (ctx, path) in enumerate(scenes):       # the very images the evaluation scores, pixel for pixel
            assert torch.equal(_load(record.images[view]), _load(path)), (case.name, view)
            assert record.captions[view] == subject_caption(case.subject, ctx)
        assert torch.equal(_load(record.masks[0]), _load(case.reference_mask))
        _, _, _, renders = held_out_subject(cfg.world, cases.index(case))
        masks = [mask for row in renders for _, mask in row]
        for view, mask in enumerate(masks, start=1):
            assert torch.equal(_load(record.masks[view])[0], torch.from_numpy((mask * 255).astype("uint8")) / 255.0)
    with pytest.raises(ValueError, match=f"expected 1 to {len(cases)} subjects .* found {len(cases) + 1}"):
        write_held_out_manifest(tmp_path, cfg.world, len(cases) + 1)


def test_run_oracles_writes_every_row(world) -> None:
    out, cfg, _, _, _ = world
    rows = run_oracles(out, cfg=OracleConfig(subjects=2, steps=2, memorized_steps=2), world=cfg)
    assert set(rows) == {"CustomContrast", "dreambooth", "cross_attention", "adapter", "shared_kv", "memorized"}
    saved = json.loads((out / "report" / "oracles.json").read_text())
    assert saved["rows"] == rows and saved["config"]["steps"] == 2
    assert all(-1 <= r["E-appearance"] <= 1 and 0 <= r["E-text_acc"] <= 1 for r in rows.values())
    assert len((out / "report" / "oracles.md").read_text().splitlines()) == 2 + 6
    run = out / "oracles" / "memorized_2_subjects_2_steps" / "run"     # trained on the held-out subjects' scenes
    trained = json.loads((run / "config.json").read_text())
    assert trained["steps"] == 2 and trained["batch_size"] == 2
    assert [r.subject for r in read_manifest(trained["data"])] == ["heldout_00", "heldout_01"]
    with pytest.raises(ValueError, match="among dreambooth, cross_attention, adapter, shared_kv, memorized, found textual"):
        run_oracles(out, ("textual",), OracleConfig(subjects=1, steps=1), cfg)
