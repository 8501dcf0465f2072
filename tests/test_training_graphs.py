"""Frozen forward passes as CUDA graphs in training (``TrainConfig.cuda_graphs``), emulated on the CPU."""
from pathlib import Path

import pytest
import torch
from torch.utils.data import default_collate

from training.config import TrainConfig
from training.data import DataConfig, SubjectDataset, generate_synthetic, read_manifest
from training.graphed import FrozenGraphs
from training.loop import build_module
from training.models import appearance_features, clip_hidden_states, vae_latent_moments


def _module_and_batch(tmp_path: Path, **overrides):
    manifest = generate_synthetic(tmp_path / "data", num_subjects=4, views=3, size=64, seed=0)
    cfg = TrainConfig(augment=False, steps=1, batch_size=2, synthetic_subjects=4, **overrides)
    module = build_module(cfg)
    dataset = SubjectDataset(read_manifest(manifest), DataConfig(reference_size=cfg.reference_size,
                                                                 target_size=cfg.target_size, augment=False))
    return module, default_collate([dataset[0], dataset[1]])


def test_replayed_frozen_encoders_give_the_eager_features(tmp_path: Path):
    """Each frozen call is one replay per input shape; its outputs are copies (the next replay rewrites the
    static buffers) and equal the eager ones, for new inputs too."""
    module, batch = _module_and_batch(tmp_path)
    frozen, layers, graphs = module.frozen, module.model.config.clip_layers, FrozenGraphs(emulate=True)
    g = torch.Generator().manual_seed(0)
    first, second = torch.rand(4, 3, 32, 32, generator=g), torch.rand(4, 3, 32, 32, generator=g)
    with torch.no_grad():
        replayed = [clip_hidden_states(frozen.clip_vision, x, layers, graphs) for x in (first, second)]
        eager = [clip_hidden_states(frozen.clip_vision, x, layers) for x in (first, second)]
        app = appearance_features(frozen.appearance, first, graphs)
        moments = vae_latent_moments(frozen.vae, batch["target"], graphs)
        clip_hidden_states(frozen.clip_vision, first[:2], layers, graphs)          # a smaller batch: its own graph
        torch.testing.assert_close(app, appearance_features(frozen.appearance, first), rtol=0, atol=0)
        for got, want in zip(moments, vae_latent_moments(frozen.vae, batch["target"])):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    for got, want in zip(replayed, eager):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert (replayed[0] - replayed[1]).abs().max() > 0          # the first output was not rewritten
    assert len(graphs.calls) == 4 and all(call is not None for call in graphs.calls.values())


def test_a_call_that_reads_the_device_on_the_host_runs_eagerly(caplog):
    graphs = FrozenGraphs(emulate=True)
    x = torch.rand(3, 5)

    def reads(t):
        return (t * float(t.sum()),)
    with caplog.at_level("WARNING", logger="customcontrast"):
        out = graphs.run(("reads",), reads, x)[0]
        again = graphs.run(("reads",), reads, x)[0]
    torch.testing.assert_close(out, x * float(x.sum()))
    torch.testing.assert_close(again, out)
    assert list(graphs.calls.values()) == [None]
    assert sum("without a CUDA graph" in r.message for r in caplog.records) == 1


@pytest.mark.parametrize("drop_image", [0.0, 1.0])
def test_training_step_with_replayed_frozen_encoders_equals_the_eager_step(tmp_path: Path, drop_image):
    """The whole step (losses and gradients) is the same with the frozen encoders replayed."""
    results = []
    for graphed in (False, True):
        torch.manual_seed(0)
        module, batch = _module_and_batch(tmp_path / str(graphed), drop_image=drop_image, drop_text=0.0,
                                          drop_both=0.0, cuda_graphs=graphed)
        assert (module.graphs is not None) == graphed
        if graphed:
            module.graphs = FrozenGraphs(emulate=True)   # the CPU stand-in for the CUDA graphs
        losses, grads = [], []
        for step in range(2):
            loss, terms = module(batch, torch.Generator().manual_seed(step))
            loss.backward()
            losses.append({k: float(v.detach()) for k, v in terms.items()})
            grads.append([p.grad.clone() for p in module.model.parameters() if p.grad is not None])
            module.model.zero_grad(set_to_none=True)
        results.append((losses, grads, module.graphs))
    (eager_losses, eager_grads, _), (graph_losses, graph_grads, graphs) = results
    assert graph_losses == eager_losses
    for a, b in zip(eager_grads, graph_grads):
        for x, y in zip(a, b):
            torch.testing.assert_close(y, x, rtol=0, atol=0)
    assert len(graphs.calls) == 3 and all(call is not None for call in graphs.calls.values())
