"""Resuming continues the data order exactly, keeps the whole history and refuses a changed run; one
DataLoader per epoch serves the same batches."""
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from training import loop, run
from training.config import TrainConfig
from training.data import global_batches
from training.state import TrainingState

QUICK = ["--set", "synthetic_subjects=8", "--set", "synthetic_views=3", "--set", "save_every=1"]   # 2 batches/epoch


def train(folder, steps, *extra):
    return load_file(str(run.main(["--output-dir", str(folder), "--steps", str(steps), *QUICK, *extra])))


def history(folder):
    return [json.loads(line) for line in (folder / "logs" / "history.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("extra, steps, split, position", [
    ((), 3, 2, {"epoch": 1, "batch": 1, "micro_batches": 3}),                  # resumed at the end of epoch 0
    (("--set", "grad_accum=2"), 2, 1, {"epoch": 2, "batch": 0, "micro_batches": 4}),   # 2 micro-batches a step
    (("legacy",), 3, 2, {"epoch": 1, "batch": 1, "micro_batches": 3}),         # a checkpoint without the position
])
def test_resume_equals_the_uninterrupted_run(tmp_path, extra, steps, split, position):
    legacy = extra == ("legacy",)
    extra = () if legacy else extra
    full = train(tmp_path / "full", steps, *extra)
    train(tmp_path / "split", split, *extra)
    if legacy:   # as written before the position was recorded: the epoch of the last batch trained on
        (tmp_path / "split" / "checkpoints" / f"step_{split:06d}" / "state.json").write_text(
            json.dumps({"step": split, "epoch": 0}))
    resumed = train(tmp_path / "split", steps, *extra, "--resume", "latest")
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)
    assert history(tmp_path / "split") == history(tmp_path / "full")
    assert [r["step"] for r in history(tmp_path / "split")] == list(range(1, steps + 1))
    saved = json.loads((tmp_path / "split" / "checkpoints" / f"step_{steps:06d}" / "state.json").read_text())
    assert saved == {"step": steps, **position, "processes": 1}


def test_resume_refuses_a_config_that_changes_the_run(tmp_path):
    train(tmp_path / "run", 1)
    before = (tmp_path / "run" / "config.json").read_text()
    with pytest.raises(ValueError) as err:
        train(tmp_path / "run", 2, "--batch-size", "2", "--seed", "1", "--set", "grad_accum=2", "--resume", "latest")
    assert ("these fields differ from the run's " + str(tmp_path / "run" / "config.json") +
            " (batch_size: 4 -> 2; grad_accum: 1 -> 2; seed: 0 -> 1); only steps, save_every, log_every, "
            "num_workers, output_dir, gradient_checkpointing, allow_unmasked, allow_single_view, "
            "keep_checkpoints, sample_every, sample_prompts, sample_seeds, sample_steps, sample_guidance may change "
            "on resume") in str(err.value)
    assert (tmp_path / "run" / "config.json").read_text() == before   # not replaced by the refused config
    train(tmp_path / "run", 2, "--set", "save_every=2", "--resume", "latest")   # steps and save_every may change
    assert [r["step"] for r in history(tmp_path / "run")] == [1, 2]


def test_one_dataloader_per_epoch_gives_the_same_batches(tmp_path, monkeypatch):
    made, seen = [], []

    class Counted(loop.DataLoader):
        def __init__(self, *args, **kwargs):
            made.append(kwargs["num_workers"])
            super().__init__(*args, **kwargs)

    iterate = loop._batch_iterator

    def spy(*args, **kwargs):
        for epoch, index, batch in iterate(*args, **kwargs):
            seen.append((epoch, index, batch["subject_index"].tolist()))
            yield epoch, index, batch

    monkeypatch.setattr(loop, "DataLoader", Counted)
    monkeypatch.setattr(loop, "_batch_iterator", spy)
    train(tmp_path / "a", 5)
    expected = [(e, k, b) for e in range(3) for k, b in enumerate(global_batches(8, 4, epoch=e, seed=0))][:5]
    assert made == [0, 0, 0] and seen == expected                 # 5 steps, 3 epochs: 3 loaders
    made.clear(), seen.clear()
    train(tmp_path / "b", 5, "--set", "num_workers=1")             # a worker process, prefetching
    assert made == [1, 1, 1] and seen == expected
    assert history(tmp_path / "b") == history(tmp_path / "a")


def test_resume_position_with_another_process_count_or_an_old_checkpoint():
    cfg = TrainConfig(batch_size=4)
    restored = TrainingState(step=3, epoch=1, generator_state=torch.zeros(1), batch=3, micro_batches=3, processes=2)
    assert loop._resume_position(restored, cfg, per_epoch=5, world=2) == (1, 3)
    # 3 global batches of 2 x 4 subjects seen; 4 processes take 16 a batch: continue at ceil(24 / 16) = 2
    assert loop._resume_position(restored, cfg, per_epoch=5, world=4) == (1, 2)
    assert loop._resume_position(restored, cfg, per_epoch=2, world=4) == (2, 0)   # past the epoch's last batch
    legacy = dataclasses.replace(restored, step=5, batch=None)                    # step x grad_accum micro-batches
    assert loop._resume_position(legacy, dataclasses.replace(cfg, grad_accum=2), per_epoch=3, world=2) == (3, 1)
