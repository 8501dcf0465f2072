"""The tiny preset end to end: losses logged, export reloads, determinism, resume, kill during save,
single-view subjects."""
import json

import pytest
import torch
from safetensors.torch import load_file

from customcontrast_core import checkpoint
from training import run, state
from training.data import SubjectRecord, generate_synthetic, read_manifest, write_manifest
from training.export import export

QUICK = ["--set", "synthetic_subjects=8", "--set", "synthetic_views=3"]


def train(tmp_path, name, steps, *extra):
    return run.main(["--output-dir", str(tmp_path / name), "--steps", str(steps), *QUICK, *extra])


def weights(path):
    return load_file(str(path))


def test_tiny_preset_twenty_steps(tmp_path):
    path = train(tmp_path, "run", 20, "--set", "save_every=10")
    rows = [json.loads(line) for line in (tmp_path / "run" / "logs" / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 21))
    for name in ("loss", "ldm", "cscl", "macl", "loc"):
        assert all(torch.isfinite(torch.tensor(r[name])) for r in rows), name
    assert (tmp_path / "run" / "logs" / "loss_curve.png").stat().st_size > 1000
    model, info = checkpoint.load(path)
    assert info.step == 20 and info.base == "sd15" and len(model.visual_kv) == 16
    assert info.clip_vision.name == "tiny random CLIP vision"   # the run's own export records its CLIP vision
    out = model.encoder(torch.randn(1, 3, 17, 64), torch.tensor([10.0]))
    assert torch.isfinite(out.splus).all()
    # the training state exports to the same weights
    again = export(tmp_path / "run", out=tmp_path / "again.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(weights(path).values(), weights(again).values()))


def test_same_seed_same_weights(tmp_path):
    a = weights(train(tmp_path, "a", 4))
    b = weights(train(tmp_path, "b", 4))
    c = weights(train(tmp_path, "c", 4, "--seed", "1"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_resume_continues_exactly(tmp_path):
    full = weights(train(tmp_path, "full", 6, "--set", "save_every=3"))
    train(tmp_path, "split", 3, "--set", "save_every=3")
    resumed = weights(run.main(["--output-dir", str(tmp_path / "split"), "--steps", "6", *QUICK,
                                "--set", "save_every=3", "--resume", "latest"]))
    worst = max((full[k] - resumed[k]).abs().max().item() for k in full)
    assert worst < 1e-6, worst


def test_kill_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    train(tmp_path, "killed", 3, "--set", "save_every=3")
    root = tmp_path / "killed" / "checkpoints"
    before = state.find_checkpoint(root, "latest")
    assert before.name == "step_000003"

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing")
    monkeypatch.setattr(state, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        run.main(["--output-dir", str(tmp_path / "killed"), "--steps", "6", *QUICK, "--set", "save_every=3",
                  "--resume", "latest"])
    assert state.find_checkpoint(root, "latest") == before
    assert not [p for p in root.iterdir() if p.name.startswith(".")]      # no half-written folder left
    assert (before / "trainable.safetensors").is_file()


def test_bf16_autocast_keeps_fp32_trainable_weights(tmp_path):
    path = train(tmp_path, "bf16", 2, "--set", 'mixed_precision="bf16"')
    rows = [json.loads(line) for line in (tmp_path / "bf16" / "logs" / "history.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert all(t.dtype == torch.float32 for t in weights(path).values())


def test_single_view_subjects_train_with_allow_single_view(tmp_path):
    records = read_manifest(generate_synthetic(tmp_path / "data", num_subjects=4, views=2, size=64, seed=0))
    manifest = write_manifest(tmp_path / "single.jsonl", [SubjectRecord(r.subject, r.cls, r.images[:1], r.masks[:1])
                                                          for r in records])
    args = ["--output-dir", str(tmp_path / "single"), "--steps", "2", "--batch-size", "2", "--data", str(manifest)]
    with pytest.raises(ValueError, match="set allow_single_view=true"):
        run.main(args)
    path = run.main([*args, "--set", "allow_single_view=true"])
    rows = [json.loads(line) for line in (tmp_path / "single" / "logs" / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert checkpoint.load(path)[1].step == 2
