"""The training step's image dropout: the blank reference goes through the encoders' shared call."""
from pathlib import Path

import torch
from torch.utils.data import default_collate

from training.config import TrainConfig
from training.data import DataConfig, SubjectDataset, generate_synthetic, read_manifest
from training.loop import build_module
from training.models import clip_hidden_states


def test_image_dropped_rows_are_encoded_in_the_shared_call(tmp_path: Path):
    manifest = generate_synthetic(tmp_path / "data", num_subjects=4, views=3, size=64, seed=0)
    cfg = TrainConfig(augment=False, drop_image=1.0, drop_text=0.0, drop_both=0.0, steps=1, batch_size=2,
                      synthetic_subjects=4)
    module = build_module(cfg)
    dataset = SubjectDataset(read_manifest(manifest), DataConfig(reference_size=cfg.reference_size,
                                                                 target_size=cfg.target_size, augment=False))
    batch = default_collate([dataset[0], dataset[1]])
    vision_rows, encoded = [], []
    module.frozen.clip_vision.model.register_forward_hook(
        lambda m, args, kwargs, out: vision_rows.append(kwargs["pixel_values"].shape[0]), with_kwargs=True)
    module.model.encoder.register_forward_hook(lambda m, args, out: encoded.append((args, out)))
    for step in range(2):
        loss, terms = module(batch, torch.Generator().manual_seed(step))
        loss.backward()
        assert torch.isfinite(loss) and all(torch.isfinite(t) for t in terms.values())
    # the blank image's CLIP features once (first step); afterwards only the 2B views per step
    assert vision_rows == [4, 1, 4]
    # one MFI-Encoder call per step: reference, positive and the two blank rows, each row as if alone
    assert len(encoded) == 2
    (hidden, steps), out = encoded[-1]
    assert hidden.shape[0] == 6
    with torch.no_grad():
        alone = module.model.encoder(hidden[4:], steps[4:])
        blank = module._blank_features(batch["reference"], hidden.dtype)
        zeros = clip_hidden_states(module.frozen.clip_vision, torch.zeros_like(batch["reference"]),
                                   module.model.config.clip_layers)
    torch.testing.assert_close(out.splus[4:], alone.splus, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.visual_tokens[4:], alone.visual_tokens, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(blank.expand_as(zeros), zeros, rtol=1e-5, atol=1e-5)   # the cache = a fresh blank


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tmp_path: Path):
    manifest = generate_synthetic(tmp_path / "data", num_subjects=4, views=3, size=64, seed=0)
    dataset = SubjectDataset(read_manifest(manifest), DataConfig(reference_size=32, target_size=64, augment=False))
    batch = default_collate([dataset[0], dataset[1]])
    results = []
    for checkpointing in (False, True):
        cfg = TrainConfig(augment=False, drop_image=0.5, drop_text=0.0, drop_both=0.0, batch_size=2,
                          gradient_checkpointing=checkpointing)
        module = build_module(cfg)
        assert module.frozen.unet.is_gradient_checkpointing == checkpointing
        loss, terms = module(batch, torch.Generator().manual_seed(0))
        loss.backward()   # checkpointed blocks run their forward again here, reading the processors' state
        module.release()
        assert module.state.contexts is None and module.state.visual_kv is None and not module.state.maps
        results.append((loss.detach(), {n: p.grad for n, p in module.model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert terms["loc"] != 0 and loss_a == loss_b
    assert all(g is not None for g in grads_a.values()) and grads_a.keys() == grads_b.keys()
    assert all(torch.equal(grads_a[k], grads_b[k]) for k in grads_a)   # the same arithmetic, recomputed
