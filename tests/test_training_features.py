"""What a researcher watches and tunes in a run: sample grids made by the evaluation's sampler, log_every means in
TensorBoard, learning-rate warmup and gradient clipping (resumed bit for bit), the number of checkpoints kept and
the example config files of the paper's presets."""
import dataclasses
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from customcontrast_core import checkpoint
from customcontrast_core.config import get_preset
from training import loop, run
from training.config import PRESETS, RESUMABLE_FIELDS, TrainConfig, resume_mismatch
from training.data import read_manifest
from training.eval.generate import SampleSettings, SubjectSampler, reference_view
from training.eval.report import load_image
from training.models import build_tiny
from training.report import LossHistory
from training.schedule import clip_gradients, warmup_factor

REPO = Path(__file__).resolve().parents[1]
QUICK = ["--set", "synthetic_subjects=8", "--set", "synthetic_views=3", "--set", "save_every=1"]
SAMPLED = ["--set", "sample_every=2", "--set", "sample_steps=2", "--set", "sample_seeds=[0, 5]",
           "--set", "log_every=3", "--set", "keep_checkpoints=3"]


def train(folder, steps, *extra):
    return run.main(["--output-dir", str(folder), "--steps", str(steps), *QUICK, *extra])


def history(folder):
    return [json.loads(line) for line in (folder / "logs" / "history.jsonl").read_text().splitlines()]


def scalars(folder, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(folder / "logs"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events, [(e.step, e.value) for e in events.Scalars(tag)] if tag in events.Tags()["scalars"] else []


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 4 steps with sampling every 2 steps, log_every 3 and 3 checkpoints kept, and without."""
    root = tmp_path_factory.mktemp("features")
    train(root / "sampled", 4, *SAMPLED)
    train(root / "plain", 4, "--set", "sample_every=0", "--set", "log_every=1")
    return root / "sampled", root / "plain"


def test_sampling_logging_and_keeping_leave_the_training_unchanged(runs):
    sampled, plain = runs
    a, b = load_file(str(sampled / loop.EXPORT_NAME)), load_file(str(plain / loop.EXPORT_NAME))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert history(sampled) == history(plain) and [r["step"] for r in history(sampled)] == [1, 2, 3, 4]
    assert sorted(p.name for p in (sampled / "samples").iterdir()) == ["step_000002.png", "step_000004.png"]
    assert not (plain / "samples").exists()


def test_keep_checkpoints_keeps_exactly_that_many(runs):
    sampled, plain = runs
    assert sorted(p.name for p in (sampled / "checkpoints").glob("step_*")) == [
        "step_000002", "step_000003", "step_000004"]
    assert sorted(p.name for p in (plain / "checkpoints").glob("step_*")) == ["step_000003", "step_000004"]   # default 2


def test_tensorboard_gets_the_mean_of_the_steps_since_the_last_log(runs):
    sampled, plain = runs
    rows = history(sampled)
    events, logged = scalars(sampled, "loss/loss")
    expected = [(3, sum(r["loss"] for r in rows[:3]) / 3), (4, rows[3]["loss"])]   # every 3 steps, and the last
    assert [s for s, _ in logged] == [3, 4]
    assert [v for _, v in logged] == pytest.approx([v for _, v in expected], rel=1e-6)
    assert [e.step for e in events.Images("samples")] == [2, 4]
    _, every = scalars(plain, "loss/ldm")
    assert [(s, pytest.approx(v, rel=1e-6)) for s, v in every] == [(r["step"], r["ldm"]) for r in history(plain)]
    _, lrs = scalars(plain, "train/lr")
    assert [v for _, v in lrs] == pytest.approx([1e-3] * 4)


def test_the_grid_is_the_evaluation_samplers_images_of_the_first_subject(runs):
    sampled, _ = runs
    cfg = TrainConfig.from_file(sampled / "config.json")
    record = read_manifest(sampled / "data" / "manifest.jsonl")[0]
    model, info = checkpoint.load(sampled / loop.EXPORT_NAME)
    assert info.step == 4
    frozen = build_tiny(get_preset("tiny"), image_size=cfg.target_size, reference_size=cfg.reference_size,
                        seed=cfg.seed)
    reference = reference_view(record.images[0], record.masks[0], cfg.reference_size, record.cls)
    sampler = SubjectSampler(frozen, model)
    settings = SampleSettings(steps=2, guidance=7.5, resolution=64)
    grid = load_image(sampled / "samples" / "step_000004.png")                 # (3, 2 x 64, 3 x 64)
    assert grid.shape == (3, 128, 192)
    for row, prompt in enumerate(cfg.sample_prompts):
        for column, seed in enumerate((0, 5), start=1):
            image = sampler(prompt.replace("{cls}", record.cls), reference, settings, seed=seed)
            cell = grid[:, row * 64:(row + 1) * 64, column * 64:(column + 1) * 64]
            assert ((cell - image) * 255).abs().max() <= 0.5 + 1e-3, (row, column)   # 8-bit rounding only
    shown = F.interpolate(reference[None], size=(64, 64), mode="bilinear", antialias=True)[0].clamp(0, 1)
    assert ((grid[:, :64, :64] - shown) * 255).abs().max() <= 0.5 + 1e-3


def test_warmup_is_linear_and_resumes_bit_for_bit_with_clipping(tmp_path, monkeypatch):
    seen = []
    make = loop.make_optimizer

    def recording(*args, **kwargs):   # the learning rate each optimizer step actually uses
        optimizer = make(*args, **kwargs)
        optimizer.register_step_pre_hook(lambda opt, a, k: seen.append(opt.param_groups[0]["lr"]))
        return optimizer
    monkeypatch.setattr(loop, "make_optimizer", recording)
    schedule = ["--set", "warmup_steps=3", "--set", "max_grad_norm=0.001"]
    full = load_file(str(train(tmp_path / "full", 4, *schedule)))
    assert seen == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3], rel=1e-12)
    seen.clear()
    train(tmp_path / "split", 2, *schedule)
    resumed = load_file(str(train(tmp_path / "split", 4, *schedule, "--resume", "latest")))
    assert seen == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3], rel=1e-12)
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    rows = history(tmp_path / "split")
    assert rows == history(tmp_path / "full")
    assert all(r["grad_norm"] > 0.001 for r in rows)   # the clip acted on every step (norm before clipping)
    with pytest.raises(ValueError, match=r"\(max_grad_norm: 0.001 -> 0.01; warmup_steps: 3 -> 5\)"):
        train(tmp_path / "split", 5, "--set", "warmup_steps=5", "--set", "max_grad_norm=0.01", "--resume", "latest")


def test_clipping_bounds_the_sgd_update_to_lr_times_max_grad_norm(tmp_path):
    args = ["--set", "optimizer=sgd", "--set", "lr=1", "--set", "max_grad_norm=0.01"]
    after = load_file(str(train(tmp_path / "clip", 1, *args)))
    cfg = TrainConfig.from_file(tmp_path / "clip" / "config.json")
    before = loop.build_module(cfg).model.state_dict()
    moved = math.sqrt(sum(((after[k].double() - before[k].double()) ** 2).sum().item() for k in after))
    assert history(tmp_path / "clip")[0]["grad_norm"] > 0.1          # the unclipped step would move much further
    assert moved == pytest.approx(0.01, rel=1e-3)


def test_warmup_factor_and_clipping_only_when_gradients_sync():
    assert [warmup_factor(s, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_factor(0, 0) == warmup_factor(10, 0) == 1.0
    weight = torch.nn.Parameter(torch.ones(3))
    weight.grad = torch.full((3,), 4.0)

    def clip(parameters, max_norm):
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    accumulating = SimpleNamespace(sync_gradients=False, clip_grad_norm_=clip)
    assert clip_gradients(accumulating, [weight], 1.0) is None and weight.grad.tolist() == [4.0] * 3
    assert clip_gradients(SimpleNamespace(sync_gradients=True, clip_grad_norm_=clip), [weight], 0.0) is None
    syncing = SimpleNamespace(sync_gradients=True, clip_grad_norm_=clip)
    assert clip_gradients(syncing, [weight], 1.0) == pytest.approx(math.sqrt(48))
    assert weight.grad.norm().item() == pytest.approx(1.0, rel=1e-5)


def test_log_means_after_a_resume_include_the_restored_steps(tmp_path):
    first = LossHistory(tmp_path, log_every=3)
    logged = [first.add(s, {"loss": float(s)}, last=s == 5) for s in range(1, 6)]
    assert logged == [None, None, {"loss": 2.0}, None, {"loss": 4.5}]
    first.close()
    resumed = LossHistory(tmp_path, resume_step=4, log_every=3)   # rows 1-4 kept, 5 trained again
    assert resumed.add(5, {"loss": 5.0}) is None
    assert resumed.add(6, {"loss": 6.0}) == {"loss": 5.0}          # steps 4, 5 and 6
    resumed.close()
    with pytest.raises(ValueError, match="log_every: expected a positive integer, found 0"):
        LossHistory(tmp_path, log_every=0)


@pytest.mark.parametrize("field, value, message", [
    ("keep_checkpoints", 0, "TrainConfig.keep_checkpoints: expected >= 1 (the newest checkpoint is what --resume "
                            "reads), found 0"),
    ("warmup_steps", -1, "TrainConfig.warmup_steps: expected >= 0 (0 = off), found -1"),
    ("warmup_steps", 1.5, "TrainConfig.warmup_steps: expected an integer, found float 1.5"),
    ("max_grad_norm", -0.5, "TrainConfig.max_grad_norm: expected a number >= 0 (0 = off), found -0.5"),
    ("sample_every", -2, "TrainConfig.sample_every: expected >= 0 (0 = off), found -2"),
    ("sample_steps", 0, "TrainConfig.sample_steps: expected a positive integer, found 0"),
    ("sample_guidance", -1, "TrainConfig.sample_guidance: expected a number >= 0, found -1.0"),
    ("sample_prompts", [], "TrainConfig.sample_prompts: expected at least one prompt, found ()"),
    ("sample_prompts", "a <subject>", "TrainConfig.sample_prompts: expected a list of str, found str 'a <subject>'"),
    ("sample_prompts", ["a <subject> dog", "a dog"], "TrainConfig.sample_prompts[1]: expected a prompt naming the "
                                                     "subject by '<subject>' ({cls} is replaced by its class word), "
                                                     "found 'a dog'"),
    ("sample_seeds", [0, -1], "TrainConfig.sample_seeds: expected at least one seed, each >= 0, found (0, -1)"),
    ("sample_seeds", [], "TrainConfig.sample_seeds: expected at least one seed, each >= 0, found ()"),
])
def test_new_fields_are_checked(field, value, message):
    with pytest.raises(ValueError) as err:
        TrainConfig(**{field: value})
    assert str(err.value) == message


def test_sdxl_runs_refuse_sampling_and_what_may_change_on_resume():
    with pytest.raises(ValueError, match=r"^TrainConfig.sample_every: expected 0 for tiny_sdxl \(the evaluation "
                                         r"sampler conditions SD1.5 UNets only"):
        TrainConfig(encoder_preset="tiny_sdxl", sample_every=10)
    saved = json.loads(TrainConfig().to_json())
    watched = dataclasses.replace(TrainConfig(), sample_every=7, sample_prompts=("<subject>",), sample_seeds=(3,),
                                  sample_steps=9, sample_guidance=3.0, keep_checkpoints=5, log_every=1)
    assert resume_mismatch(saved, watched) == []
    tuned = dataclasses.replace(TrainConfig(), warmup_steps=10, max_grad_norm=1.0)
    assert resume_mismatch(saved, tuned) == ["max_grad_norm: 0.0 -> 1.0", "warmup_steps: 0 -> 10"]
    assert not {"warmup_steps", "max_grad_norm"} & set(RESUMABLE_FIELDS)


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_example_config_files_are_the_paper_presets(name):
    path = REPO / "configs" / f"{name}.json"
    data = json.loads(path.read_text())
    regenerate = ("rewrite it: python -c \"from training.config import PRESETS; open('configs/NAME.json', 'w')"
                  ".write(PRESETS['NAME'].to_json() + '\\n')\"").replace("NAME", name)
    assert sorted(data) == sorted(f.name for f in dataclasses.fields(TrainConfig)), regenerate   # every field
    assert TrainConfig.from_file(path) == PRESETS[name]
    assert run.parse_config(["--config", str(path)])[0] == PRESETS[name]                # as the docs use it
    filled, _ = run.parse_config(["--config", str(path), "--set", "data=m.jsonl"])
    assert filled == dataclasses.replace(PRESETS[name], data="m.jsonl")
