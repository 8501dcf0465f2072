"""Evaluation images: the encoder gets the reference as training builds it (segmented when masks are configured),
and generated images are reused only when checkpoint, reference, prompt, seed and settings all match."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image


DREAMBENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "dreambench"
ARGS = ["--tiny", "--subjects", "dog", "--prompts", "1", "--images", "1", "--steps", "2"]


def _png(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array).save(path)
    return path


def test_reference_view_is_the_segmented_training_reference(tmp_path):
    from training.eval.generate import reference_view
    photo = np.zeros((40, 40, 3), np.uint8)
    photo[..., 2] = 255                                      # blue background
    photo[10:20, 20:30] = (255, 0, 0)                        # a red 10 x 10 subject
    mask = np.zeros((40, 40), np.uint8)
    mask[10:20, 20:30] = 255
    image, mask_path = _png(tmp_path / "p.png", photo), _png(tmp_path / "m.png", mask)
    ref = reference_view(image, mask_path, 24)
    # square crop 1.2 x the subject's box (12 px, subject in its central 10) resized to 24: the subject fills
    # rows/cols 2..21, gray (0.5) around it, and no background photo pixel survives
    assert ref.shape == (3, 24, 24)
    torch.testing.assert_close(ref[:, 4:20, 4:20], torch.tensor([1.0, 0.0, 0.0])[:, None, None].expand(3, 16, 16))
    torch.testing.assert_close(ref[:, :1], torch.full((3, 1, 24), 0.5))
    assert ref[2].max() <= 0.5 + 1e-6
    whole = reference_view(image, None, 24)                  # no mask: the whole photo, padded to 1.2x on gray
    torch.testing.assert_close(whole[:, 0, 0], torch.full((3,), 0.5))
    torch.testing.assert_close(whole[:, 12, 6], torch.tensor([0.0, 0.0, 1.0]), atol=0.02, rtol=0)


class _StubSampler:
    """Records what the evaluation asks for; a subject image's value depends on the model's weights (the base
    model's images, without a reference, do not use them)."""
    calls: list = []

    def __init__(self, frozen, model) -> None:
        self.value = float(torch.cat([p.flatten() for p in model.parameters()]).detach().sum()) % 1

    def __call__(self, prompt, reference, settings, seed):
        _StubSampler.calls.append((prompt, reference, settings.steps))
        return torch.full((3, 64, 64), 0.25 if reference is None else self.value)


@pytest.fixture
def stub_sampler(monkeypatch):
    from training import evaluate
    _StubSampler.calls = []
    monkeypatch.setattr(evaluate, "SubjectSampler", _StubSampler)
    return _StubSampler.calls


def _checkpoint(tmp_path: Path, seed: int) -> str:
    from customcontrast_core import checkpoint
    from customcontrast_core.config import get_preset
    from customcontrast_core.visual_kv import CustomContrastModel
    torch.manual_seed(seed)
    return str(checkpoint.save(tmp_path / f"cc{seed}.safetensors", CustomContrastModel(get_preset("tiny"))))


@pytest.mark.skipif(not DREAMBENCH.is_dir(), reason="shared DreamBench data not found")
def test_images_are_reused_only_for_the_same_checkpoint_and_settings(tmp_path, stub_sampler):
    from training import evaluate

    a, b = _checkpoint(tmp_path, 1), _checkpoint(tmp_path, 2)
    run = lambda *extra: json.loads(evaluate.main([*ARGS, *extra]).read_text())  # noqa: E731
    out = ["--out", str(tmp_path / "eval")]
    first = run("--checkpoint", a, *out)
    assert len(stub_sampler) == 4                            # 2 prompts (reconstruction + 1) x (subject, base)
    again = run("--checkpoint", a, *out)                     # same checkpoint and settings: resumed, nothing made
    assert len(stub_sampler) == 4 and again["methods"] == first["methods"]
    other = run("--checkpoint", b, *out)                     # another checkpoint: its subject images are made again
    assert len(stub_sampler) == 6 and other["protocol"]["models"]["checkpoint"] == b
    fresh = run("--checkpoint", b, "--out", str(tmp_path / "fresh"))
    assert other["methods"] == fresh["methods"] != first["methods"]
    assert first["images"]["CustomContrast γ=1"] == {"generated": 2, "reused": 0, "replaced": 0}
    assert again["images"]["CustomContrast γ=1"] == {"generated": 0, "reused": 2, "replaced": 0}
    assert other["images"]["CustomContrast γ=1"] == {"generated": 0, "reused": 0, "replaced": 2}
    assert other["images"]["base model, no subject (lower bound)"] == {"generated": 0, "reused": 2, "replaced": 0}
    steps = run("--checkpoint", b, *out, "--steps", "3")   # other settings: everything again
    assert [c[2] for c in stub_sampler[-4:]] == [3, 3, 3, 3] and len(stub_sampler) == 10 + 4
    assert steps["images"]["base model, no subject (lower bound)"]["replaced"] == 2


@pytest.mark.skipif(not DREAMBENCH.is_dir(), reason="shared DreamBench data not found")
def test_encoder_gets_the_segmented_reference_when_masks_are_configured(tmp_path, stub_sampler, monkeypatch):
    from training import evaluate

    mask = np.zeros((512, 512), np.uint8)
    mask[128:384, 192:320] = 255                             # a 256 x 128 subject box
    mask_path = _png(tmp_path / "mask.png", mask)
    build = evaluate.build
    monkeypatch.setattr(evaluate, "build", lambda args, extra: (*build(args, extra)[:4], lambda path: mask_path))
    evaluate.main([*ARGS, "--out", str(tmp_path / "eval")])
    references = [c[1] for c in stub_sampler if c[1] is not None]
    assert len(references) == 2
    reference = str(DREAMBENCH / "dog" / "00.jpg")
    assert references[0].shape == (3, 32, 32)               # the training reference size, not the 512 px photo
    from training.eval.generate import reference_view
    torch.testing.assert_close(references[0], reference_view(reference, mask_path, 32))
    # the 256 x 128 box in a square of 1.2 x 256: gray columns on both sides of the subject
    torch.testing.assert_close(references[0][:, :, :6], torch.full((3, 32, 6), 0.5))
