"""What training survives: bad manifests and views, non-finite settings and losses, full disks, damaged
and half-written checkpoints, the umask, bad config files and remote model names."""
import errno
import json
import logging
import os
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from customcontrast_core import checkpoint
from customcontrast_core.config import get_preset
from customcontrast_core.visual_kv import CustomContrastModel
from training import loop, run, state
from training.config import ModelPaths, TrainConfig
from training.data import DataConfig, SubjectDataset, generate_synthetic, read_manifest
from training.eval.metrics import ClipScorer
from training.models import build_from_paths

QUICK = ["--set", "synthetic_subjects=8", "--set", "synthetic_views=3"]
ROOT = Path(__file__).resolve().parents[1]


def train(folder, steps, *extra, cli=False):
    args = ["--output-dir", str(folder), "--steps", str(steps), *QUICK, *extra]
    return run.cli(args) if cli else run.main(args)


def history(folder):
    return [json.loads(line) for line in (folder / "logs" / "history.jsonl").read_text().splitlines()]


@pytest.fixture()
def manifest(tmp_path):
    return generate_synthetic(tmp_path / "s", num_subjects=4, views=3, size=32, seed=0)


# bad manifests: every line is checked before a step runs ---------------------------------------------------
GOOD = '{"subject": "a", "class": "dog", "images": ["a0.png", "a1.png"]}'


@pytest.mark.parametrize("line, message", [
    ("5", r"expected a JSON object \{\"subject\": \.\.\., \"class\": \.\.\., \"images\": \[\.\.\.\]\}, found a number 5"),
    ("null", r"expected a JSON object .*, found null$"),
    ('["a.png"]', r"expected a JSON object .*, found a list \[\"a.png\"\]"),
    ('{"subject": "b", "class": "dog", "images": ["b0.png", "b1.png"], "caption": 5}',
     r"subject 'b': caption must be a string or null, found a number 5"),
    ('{"subject": 7, "class": "dog", "images": ["b0.png", "b1.png"]}', r"subject 7: subject must be a string, found a number 7"),
    ('{"subject": "b", "class": ["dog"], "images": ["b0.png", "b1.png"]}', r"subject 'b': class must be a string, found a list \[\"dog\"\]"),
    ('{"subject": "b", "class": "dog", "images": ["b0.png", 3]}', r"'images' must be a list of path strings, found a list"),
    ('{"subject": "b", "class": "dog", "images": ["b0.png", "b1.png"], "masks": "m.png"}',
     r"'masks' must be null or a list of path strings, found a string \"m.png\""),
    ('{"subject": "b", "class": "dog", "images": ["b0.png", "b1.png"], "mask": null}',
     r"unknown fields \['mask'\]; expected subject, class, images, masks, caption"),
])
def test_every_manifest_line_is_checked_up_front(tmp_path, line, message):
    path = tmp_path / "m.jsonl"
    path.write_text(f"{GOOD}\n{line}\n")
    with pytest.raises(ValueError, match=rf"m\.jsonl:2: {message}"):
        read_manifest(path)


def test_a_bad_manifest_line_stops_training_before_any_step(tmp_path, manifest):
    lines = manifest.read_text().splitlines()
    lines[2] = lines[2].replace('"caption": null', '"caption": 5')
    manifest.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"manifest\.jsonl:3: subject 'subject_0002': caption must be a string or "
                                         r"null, found a number 5"):
        run.main(["--output-dir", str(tmp_path / "run"), "--steps", "4", "--batch-size", "2", "--data", str(manifest)])
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_caption_without_the_placeholder_is_refused_up_front(manifest):
    records = read_manifest(manifest)
    records[1] = type(records[1])(records[1].subject, records[1].cls, records[1].images, records[1].masks,
                                  "a photo of a dog")
    with pytest.raises(ValueError, match=r"subject 'subject_0001': its caption 'a photo of a dog' has no '<subject>'"):
        SubjectDataset(records, DataConfig(reference_size=32, target_size=32))


def test_a_subject_listed_many_times_is_warned_about(tmp_path, manifest, caplog):
    lines = manifest.read_text().splitlines()
    path = tmp_path / "repeated.jsonl"
    path.write_text("\n".join([lines[0]] * 24 + lines[1:]) + "\n")
    with caplog.at_level(logging.WARNING):
        records = read_manifest(path)
    assert len(records) == 27
    assert (f"{path}: subject 'subject_0000' is listed 24 times (lines 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, ...): every "
            "line is taken as a different subject") in caplog.text
    caplog.clear()
    read_manifest(manifest)
    assert "listed" not in caplog.text


# views that do not decode mid-run: skipped, the file named ---------------------------------------------------
def bomb_png(path: Path, side: int = 20000) -> None:
    """A PNG whose header declares side x side pixels (PIL refuses it with DecompressionBombError)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def test_a_decompression_bomb_is_skipped_naming_the_file(manifest, caplog):
    records = read_manifest(manifest)
    bomb_png(Path(records[0].images[0]))
    dataset = SubjectDataset(records, DataConfig(reference_size=32, target_size=32, augment=False))
    with caplog.at_level(logging.WARNING):
        sample = dataset.sample(0, 0, [2])
    assert sample["subject_index"] == 2
    assert (f"skipping subject 'subject_0000' (item 0): {records[0].images[0]} cannot be decoded as an image "
            "(DecompressionBombError: ") in caplog.text


def test_an_all_zero_mask_skips_its_subject_naming_the_mask(manifest, caplog):
    from PIL import Image
    records = read_manifest(manifest)
    Image.new("L", (32, 32), 0).save(records[1].masks[0])
    dataset = SubjectDataset(records, DataConfig(reference_size=32, target_size=32, augment=False))
    with caplog.at_level(logging.WARNING):
        sample = dataset.sample(1, 0, [3])
    assert sample["subject_index"] == 3
    assert (f"skipping subject 'subject_0001' (item 1): mask {records[1].masks[0]} has no foreground pixel") \
        in caplog.text
    for record in records:   # nothing readable left: the error says why
        Image.new("L", (32, 32), 0).save(record.masks[0])
    with pytest.raises(RuntimeError, match=r"all unreadable \(of 4 subjects; the last: mask .* has no foreground"):
        dataset.sample(0, 0, [1, 2, 3])


# non-finite settings, losses and weights -----------------------------------------------------------------------
@pytest.mark.parametrize("setting", ["lr=Infinity", "lr=NaN", "weight_decay=Infinity", "lambda_loc=-Infinity",
                                     "macl_temperature=Infinity"])
def test_non_finite_float_fields_are_refused(setting, capsys):
    with pytest.raises(SystemExit) as err:
        run.parse_config(["--set", setting])
    assert err.value.code == 2
    field, value = setting.split("=")
    found = {"Infinity": "inf", "-Infinity": "-inf", "NaN": "nan"}[value]
    assert f"TrainConfig.{field}: expected a finite number, found float {found}" in capsys.readouterr().err


def exported(caplog) -> list[str]:
    """The command's "exported PATH" lines."""
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("exported ")]


def poison_after(monkeypatch, steps: int) -> None:
    """The optimizer fills the first trainable tensor with NaN at its ``steps``-th step."""
    make = loop.make_optimizer

    def poisoned(params, cfg, device):
        optimizer = make(params, cfg, device)
        step, count = optimizer.step, []

        def step_then_poison(*args, **kwargs):
            out = step(*args, **kwargs)
            count.append(1)
            if len(count) == steps:
                with torch.no_grad():
                    optimizer.param_groups[0]["params"][0].fill_(float("nan"))
            return out
        optimizer.step = step_then_poison
        return optimizer
    monkeypatch.setattr(loop, "make_optimizer", poisoned)


def test_weights_that_turn_nan_are_never_saved(tmp_path, monkeypatch, caplog):
    poison_after(monkeypatch, 2)
    first = next(iter(CustomContrastModel(get_preset("tiny")).state_dict()))
    with caplog.at_level(logging.INFO), pytest.raises(SystemExit) as exit_:
        train(tmp_path / "run", 3, "--set", "save_every=1", cli=True)
    assert exit_.value.code == 1
    root = tmp_path / "run" / "checkpoints"
    assert (f"training diverged at step 2: the trainable weights ['{first}'] (1 tensors) hold NaN or Inf after the "
            f"optimizer step; nothing of this step is saved or exported and the previous checkpoint "
            f"{root / 'step_000001'} is kept") in caplog.text
    assert not exported(caplog)
    assert state.find_checkpoint(root, "latest").name == "step_000001" and not (root / "step_000002").exists()
    assert checkpoint.load(tmp_path / "run" / "customcontrast.safetensors")[1].step == 1   # finite: the loader checks


def test_a_non_finite_loss_stops_the_run(tmp_path, monkeypatch):
    poison_after(monkeypatch, 1)   # step 1's weights turn NaN, so step 2's loss is NaN (no save at step 1)
    with pytest.raises(loop.TrainingDiverged, match=r"training diverged at step 2: non-finite: loss nan, ldm nan.*; "
                                                     r"the weights \['.*'\] \(1 tensors\) hold NaN or Inf; nothing of "
                                                     r"this step is saved or exported and no earlier checkpoint exists"):
        train(tmp_path / "run", 3, "--set", "save_every=3")
    assert not (tmp_path / "run" / "customcontrast.safetensors").exists()


def test_a_non_finite_loss_on_another_process_stops_this_one_too(tmp_path):
    """With several processes every one stops at the same step (one alone would leave the others waiting)."""
    def check(others_finite: float) -> None:   # reduce: the sum of every process's "finite" flag
        accelerator = SimpleNamespace(num_processes=2, device="cpu", reduce=lambda flag, reduction: flag + others_finite)
        loop._check_loss(4, torch.tensor(1.0), {"ldm": torch.tensor(1.0)}, nn.Linear(2, 2),
                         TrainConfig(output_dir=str(tmp_path)), accelerator)
    check(1.0)
    with pytest.raises(loop.TrainingDiverged, match=r"training diverged at step 4: the loss is non-finite on another "
                                                     r"process \(finite: loss 1, ldm 1\); nothing of this step"):
        check(0.0)


# full disks and damaged checkpoints ---------------------------------------------------------------------------
def tiny_state(step: int):
    torch.manual_seed(step)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, optimizer, state.TrainingState(step=step, epoch=0, batch=step, generator_state=torch.Generator().get_state())


@pytest.mark.parametrize("owner, error, file", [   # torch.save's zip writer reports a full disk as "unexpected pos"
    (state, OSError(errno.ENOSPC, "No space left on device"), "trainable.safetensors"),
    (state.torch, RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 5120 vs 4992"), "optimizer.pt")])
def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, owner, error, file):
    root = tmp_path / "checkpoints"
    model, optimizer, saved = tiny_state(1)
    state.save_state(root, model, optimizer, saved)

    def full(*args, **kwargs):
        raise error
    monkeypatch.setattr(owner, "save_file" if owner is state else "save", full)
    with pytest.raises(state.CheckpointWriteError) as err:
        state.save_state(root, *tiny_state(2))
    assert re.search(rf"could not write {root}/\.step_000002\.\w+\.tmp/{file}: the disk is full \(", str(err.value))
    assert str(err.value).endswith(f"the checkpoint step_000002 (step 2) was not saved and the previous checkpoint "
                                   f"{root / 'step_000001'} is kept")
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000001"]   # no temporary folder left
    monkeypatch.undo()
    restored = nn.Linear(3, 2)
    assert state.load_state(state.find_checkpoint(root, "latest"), restored, torch.optim.SGD(restored.parameters(), 0.1)).step == 1
    assert torch.equal(restored.weight, model.weight)


def test_a_full_disk_during_the_export_stops_the_run_and_resume_writes_it(tmp_path, monkeypatch, caplog):
    save = checkpoint.save

    def full_at_step_2(path, model, *, step, **kwargs):
        if step == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(path, model, step=step, **kwargs)
    monkeypatch.setattr(loop.checkpoint, "save", full_at_step_2)
    with caplog.at_level(logging.INFO), pytest.raises(SystemExit) as exit_:
        train(tmp_path / "run", 2, "--set", "save_every=1", cli=True)
    export = tmp_path / "run" / "customcontrast.safetensors"
    assert exit_.value.code == 1 and not exported(caplog)
    assert (f"could not write {export}: the disk is full (OSError: [Errno 28] No space left on device); the training "
            "checkpoint of step 2 is complete") in caplog.text
    assert checkpoint.read_info(export).step == 1   # the previous export is kept
    monkeypatch.undo()
    assert checkpoint.read_info(train(tmp_path / "run", 2, "--set", "save_every=1", "--resume", "latest")).step == 2


def test_a_truncated_latest_falls_back_to_the_previous_complete_step(tmp_path, caplog):
    root = tmp_path / "checkpoints"
    for step in (1, 2):
        state.save_state(root, *tiny_state(step))
    weights = root / "step_000002" / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7])
    with caplog.at_level(logging.WARNING):
        assert state.find_checkpoint(root, "latest") == root / "step_000001"
    assert f"checkpoint {root / 'step_000002'} is incomplete or damaged ({weights} is missing or damaged (" in caplog.text
    with pytest.raises(ValueError, match=rf"training checkpoint {root / 'step_000002'} is incomplete or damaged: "
                                         rf"{weights} is missing or damaged"):
        state.find_checkpoint(root, "step_000002")
    optimizer = root / "step_000001" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    assert state.find_checkpoint(root, "latest") is None   # nothing complete left: training starts over


# interrupted saves: temporary names removed, the history whole -------------------------------------------------
def test_unfinished_saves_are_removed_at_the_next_start(tmp_path):
    out = tmp_path / "run"
    ours = [out / "checkpoints" / ".step_000004.k2j3h4.tmp" / "trainable.safetensors",
            out / "checkpoints" / ".latest.a8b7c6.tmp", out / "checkpoints" / ".latest.zz1y2x",
            out / ".customcontrast.safetensors.1a2b3c4d.tmp", out / "logs" / ".history.jsonl.tmp",
            out / "data" / ".manifest.jsonl.q1w2e3"]
    theirs = [out / "checkpoints" / "notes.tmp", out / ".other.safetensors.1a2b3c4d.tmp", out / "logs" / ".keep",
              out / "data" / "manifest.jsonl.bak"]
    for path in ours + theirs:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    train(out, 1)
    assert [p for p in ours if p.exists()] == [] and not ours[0].parent.exists()
    assert all(p.read_text() == "x" for p in theirs)


@pytest.mark.parametrize("cut", ["export", "state"])
def test_history_keeps_every_step_when_a_save_is_cut(tmp_path, monkeypatch, cut):
    """A kill after step 2's checkpoint was written (cut="export") or while it was written (cut="state"): the
    resumed run's history equals the uninterrupted one's, without a gap or a repeated step."""
    train(tmp_path / "full", 3, "--set", "save_every=1")
    save = checkpoint.save if cut == "export" else state.save_file
    calls = []

    def killed_at_step_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed while saving")
        return save(*args, **kwargs)
    monkeypatch.setattr(*((loop.checkpoint, "save") if cut == "export" else (state, "save_file")), killed_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "cut", 3, "--set", "save_every=1")
    monkeypatch.undo()
    resumed_from = state.find_checkpoint(tmp_path / "cut" / "checkpoints", "latest").name
    assert resumed_from == ("step_000002" if cut == "export" else "step_000001")
    train(tmp_path / "cut", 3, "--set", "save_every=1", "--resume", "latest")
    assert history(tmp_path / "cut") == history(tmp_path / "full")
    assert [r["step"] for r in history(tmp_path / "cut")] == [1, 2, 3]


# the umask ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mask, folder, file", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600), (0o002, 0o775, 0o664)])
def test_checkpoints_follow_the_umask(tmp_path, mask, folder, file):
    from training.data import SubjectRecord, write_manifest
    old = os.umask(mask)
    try:
        root = tmp_path / "checkpoints"
        saved = state.save_state(root, *tiny_state(1))
        manifest = write_manifest(tmp_path / "data" / "manifest.jsonl", [SubjectRecord("a", "dog", ("a.png", "b.png"))])
    finally:
        os.umask(old)
    mode = lambda p: p.stat().st_mode & 0o777  # noqa: E731
    assert mode(saved) == folder
    assert {p.name: mode(p) for p in [*saved.iterdir(), root / "latest", manifest]} == dict.fromkeys(
        ["trainable.safetensors", "optimizer.pt", "state.json", "latest", "manifest.jsonl"], file)


# config files ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, message", [
    ('[["lr", 0.1]]', r"expected a JSON object of TrainConfig fields \(\{\"lr\": 0.0001, \.\.\.\}\), found a JSON list"),
    ('{"lr": 0.1,\n  "steps": }', r"expected JSON, found invalid JSON at line 2 column 12 \(Expecting value\)"),
    ('"lr=0.1"', r"expected a JSON object of TrainConfig fields .*, found a JSON string"),
    ('{"lr": Infinity}', r"TrainConfig.lr: expected a finite number, found float inf"),
])
def test_config_files_name_the_file_what_was_expected_and_found(tmp_path, capsys, text, message):
    path = tmp_path / "my config.json"
    path.write_text(text)
    with pytest.raises(SystemExit) as err:
        run.parse_config(["--config", str(path)])
    assert err.value.code == 2
    stderr = capsys.readouterr().err
    assert re.search(message, stderr), stderr
    if "TrainConfig.lr" not in message:
        assert f"--config: config file {path}: " in stderr
    with pytest.raises(ValueError, match=rf"config file {path}: {message}"):
        TrainConfig.from_file(path)


def test_a_missing_config_file_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run.parse_config(["--config", str(tmp_path / "nope.json")])
    assert (f"--config: config file {tmp_path / 'nope.json'}: expected a readable JSON text file, found an error: "
            "No such file or directory") in capsys.readouterr().err


def test_resuming_with_a_damaged_run_config_names_it(tmp_path):
    config = tmp_path / "config.json"
    config.write_text('{"lr": 0.1')
    with pytest.raises(ValueError, match=rf"cannot resume {tmp_path / 'ck'}: the run's {config} is not a valid "
                                         rf"training config \(config file {config}: expected JSON, found invalid JSON"):
        loop._check_resumable(config, TrainConfig(), tmp_path / "ck")


# remote model names and the hub ------------------------------------------------------------------------------
def test_remote_open_clip_names_are_refused(monkeypatch):
    import open_clip

    def download(*args, **kwargs):
        raise AssertionError("open_clip would have fetched the model")
    monkeypatch.setattr(open_clip, "create_model", download)
    with pytest.raises(ValueError, match=r"TrainConfig.paths.appearance_model: expected a built-in open_clip "
                                         r"architecture name .*, found 'hf-hub:laion/CLIP-ViT-B-32'"):
        ModelPaths(appearance_model="hf-hub:laion/CLIP-ViT-B-32")
    with pytest.raises(ValueError, match=r"paths.appearance_model: expected a built-in open_clip architecture name "
                                         r"\(e.g. ViT-B-32, ViT-H-14\), found 'ViT-Q-99'"):
        build_from_paths(get_preset("sd15"), ModelPaths(appearance_model="ViT-Q-99"))   # before any loading
    with pytest.raises(ValueError, match=r"the CLIP-T / CLIP-I model name: expected a built-in open_clip "
                                         r"architecture name .*found 'hf-hub:timm/x'; remote names are never fetched"):
        ClipScorer("hf-hub:timm/x", tiny=True)


@pytest.mark.parametrize("env_value", [None, "0"])
def test_the_training_command_keeps_the_hub_offline(env_value):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    if env_value is not None:
        env["HF_HUB_OFFLINE"] = env_value
    code = ("import os, sys; import training.run; print('huggingface_hub' in sys.modules, os.environ['HF_HUB_OFFLINE']);"
            "from huggingface_hub import constants; print(constants.HF_HUB_OFFLINE)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "1", "True"]
