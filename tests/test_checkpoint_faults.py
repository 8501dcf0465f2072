"""Checkpoint files under faults: every header length, pickles and zips, crafted configs, truncation,
interrupted and failed writes, the umask, and the same errors through a real ComfyUI's Load node."""
import json
import os
import pickle
import re
import signal
import struct
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from customcontrast_core import CustomContrastModel, get_preset
from customcontrast_core import checkpoint, safetensors_file
from customcontrast_core.checkpoint import CheckpointError
from training.config import TrainConfig
from training.export import export

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    model = CustomContrastModel(get_preset("tiny"))
    return model, checkpoint.save(tmp_path_factory.mktemp("tiny") / "tiny.safetensors", model, step=7)


def split(path):
    """(header dict, tensor data bytes) of a safetensors file."""
    raw = Path(path).read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write(path, header, data, pad_to=None):
    """A safetensors file with exactly this header (compact JSON, optionally space-padded to ``pad_to`` bytes)."""
    text = json.dumps(header, separators=(",", ":")).encode()
    text = text.ljust(pad_to or len(text))
    Path(path).write_bytes(struct.pack("<Q", len(text)) + text + data)
    return len(text)


def with_config(path, tiny, **changes):
    """The tiny checkpoint with its metadata config (and the fields the metadata repeats) changed."""
    header, data = split(tiny[1])
    config = {**json.loads(header["__metadata__"]["config"]), **changes}
    header["__metadata__"]["config"] = json.dumps(config)
    write(path, header, data)
    return path


# Finding: valid files refused as pickles (the first byte is the low byte of the header length)

def test_every_header_length_modulo_256_loads(tiny, tmp_path):
    model, source = tiny
    header, data = split(source)
    reference = model.state_dict()
    residues = set()
    for k in range(256):
        extra = {"pad": "x" * k}
        header["__metadata__"]["extra"] = json.dumps(extra)
        path = tmp_path / f"pad{k}.safetensors"
        residues.add(write(path, header, data) % 256)
        loaded, info = checkpoint.load(path)
        assert info.extra == extra and info.step == 7
        assert all(torch.equal(reference[key], value) for key, value in loaded.state_dict().items())
        path.unlink()
    assert residues == set(range(256))


def test_a_saved_file_whose_header_length_is_128_mod_256_loads(tiny, tmp_path):
    """The case seen: safetensors pads headers to 8 bytes, so 1 save in 32 had a first byte 0x80."""
    model, _ = tiny
    for k in range(300):
        path = checkpoint.save(tmp_path / "m.safetensors", model, extra={"pad": "x" * k})
        n = struct.unpack("<Q", path.read_bytes()[:8])[0]
        if n % 256 == 128:
            break
    assert path.read_bytes()[0] == 0x80
    assert checkpoint.load(path)[1].extra == {"pad": "x" * k}


class _Marker:
    def __reduce__(self):
        return (Path.touch, (Path(os.environ["CC_PICKLE_MARKER"]),))


def _pickle(path, protocol):
    with open(path, "wb") as f:
        pickle.dump({"weights": _Marker()}, f, protocol=protocol)


@pytest.mark.parametrize("kind, make, found", [
    ("pickle2", lambda p: _pickle(p, 2), "pickle protocol 2"),
    ("pickle3", lambda p: _pickle(p, 3), "pickle protocol 3"),
    ("pickle4", lambda p: _pickle(p, 4), "pickle protocol 4"),
    ("pickle5", lambda p: _pickle(p, 5), "pickle protocol 5"),
    ("torch_zip", lambda p: torch.save({"w": torch.zeros(3)}, p), "zip archive"),
    ("torch_legacy", lambda p: torch.save({"w": torch.zeros(3)}, p, _use_new_zipfile_serialization=False),
     "pickle protocol 2"),
    ("zip", lambda p: zipfile.ZipFile(p, "w").writestr("data.pkl", b"x"), "zip archive"),
])
def test_pickles_and_zips_are_refused_without_unpickling(tmp_path, monkeypatch, kind, make, found):
    marker = tmp_path / "unpickled"
    monkeypatch.setenv("CC_PICKLE_MARKER", str(marker))
    path = tmp_path / f"{kind}.safetensors"
    make(path)
    with pytest.raises(CheckpointError, match=rf"{path} is a pickle / torch.save file \({found}.*never loaded"):
        checkpoint.load(path)
    assert not marker.exists()


# Finding: a crafted small file whose config claims a huge model

def _no_module(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a module was built for a refused file")
    monkeypatch.setattr(checkpoint, "CustomContrastModel", refuse)


def test_a_config_claiming_huge_depth_is_refused_at_once(tiny, tmp_path, monkeypatch):
    _no_module(monkeypatch)
    path = with_config(tmp_path / "deep.safetensors", tiny, depth=20000)
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=r"no valid encoder config \(encoder config depth: expected an integer "
                                              r"in \[1, 256\], found 20000\)"):
        checkpoint.load(path)
    assert time.perf_counter() - start < 0.2


def test_a_config_inflated_within_range_is_refused_from_the_header(tiny, tmp_path, monkeypatch):
    """Depth 256 against a file of 1 tensor: at most 2 x 1 + 64 expected names are enumerated, no module built."""
    _no_module(monkeypatch)
    header, _ = split(tiny[1])
    config = {**json.loads(header["__metadata__"]["config"]), "depth": 256, "width": 65536}
    meta = {**header["__metadata__"], "config": json.dumps(config)}
    path = tmp_path / "crafted.safetensors"
    write(path, {"__metadata__": meta, "x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4)
    assert path.stat().st_size < 2000
    enumerated = []
    real = checkpoint.expected_shapes
    monkeypatch.setattr(checkpoint, "expected_shapes", lambda c: (enumerated.append(k) or (k, s) for k, s in real(c)))
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=r"does not match its config \(sd15, depth 256, width 65536, .*\): the "
                                              r"config implies more than 66 tensors, the file holds 1 \(missing e.g. "
                                              r"\['encoder.layer_embed'"):
        checkpoint.load(path)
    assert time.perf_counter() - start < 0.2
    assert len(enumerated) == 67


def test_an_inflated_width_is_refused_by_the_first_shape(tiny, tmp_path, monkeypatch):
    _no_module(monkeypatch)
    path = with_config(tmp_path / "wide.safetensors", tiny, width=4096)
    with pytest.raises(CheckpointError, match=r"encoder.proj_in.weight has shape \(64, 64\), expected \(4096, 64\) "
                                              r"from its config \(sd15, depth 2, width 4096"):
        checkpoint.load(path)


def test_a_non_integer_width_in_a_checkpoint_names_the_field(tiny, tmp_path):
    path = with_config(tmp_path / "half.safetensors", tiny, width=64.5)
    with pytest.raises(CheckpointError, match=rf"{path}: metadata has no valid encoder config \(encoder config width: "
                                              r"expected an integer in \[1, 65536\], found 64.5\)"):
        checkpoint.load(path)


# Finding: a truncated file names no path

@pytest.mark.parametrize("keep, message", [
    (5, "has 5 bytes; a .safetensors file has at least 8"),
    (8, "is truncated: its header length says {n} header bytes follow, found none"),
    (40, r"is truncated \(incomplete\): its header length says {n} header bytes, found 32"),
    (-1, r"is truncated \(incomplete\): expected {size} bytes as its header declares, found {cut}"),
])
def test_a_truncated_file_names_the_path_and_the_sizes(tiny, tmp_path, keep, message):
    raw = tiny[1].read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    cut = keep if keep > 0 else len(raw) - 1000
    path = tmp_path / "trainable.safetensors"
    path.write_bytes(raw[:cut])
    expected = rf"{path} " + message.format(n=n, size=len(raw), cut=cut)
    with pytest.raises(CheckpointError, match=expected):
        checkpoint.load(path)
    with pytest.raises(CheckpointError, match=expected):
        safetensors_file.read_tensors(path)


def test_trailing_bytes_gaps_and_wrong_sizes_are_refused(tiny, tmp_path):
    raw = tiny[1].read_bytes()
    path = tmp_path / "x.safetensors"
    path.write_bytes(raw + b"junk")
    with pytest.raises(CheckpointError, match=rf"has 4 bytes after its last tensor: expected {len(raw)} bytes"):
        checkpoint.load(path)
    save_file({"a": torch.zeros(2), "b": torch.ones(3)}, str(path))
    header, data = split(path)
    header["b"]["data_offsets"] = [12, 24]
    write(path, header, data + b"\0" * 4)
    with pytest.raises(CheckpointError, match=r"tensor 'b' starts at data byte 12, expected 8"):
        safetensors_file.read_tensors(path)
    header["b"]["data_offsets"] = [8, 24]
    write(path, header, data + b"\0" * 4)
    with pytest.raises(CheckpointError, match=r"tensor 'b' \(F32, shape \[3\]\) needs 12 bytes, its data_offsets "
                                              r"\[8, 24\] cover 16"):
        safetensors_file.read_tensors(path)


def _run_dir(tmp_path, tensors):
    run = tmp_path / "run"
    step = run / "checkpoints" / "step_000002"
    step.mkdir(parents=True)
    (run / "config.json").write_text(TrainConfig().to_json())
    save_file(tensors, str(step / "trainable.safetensors"))
    torch.save({"optimizer": {}, "generator": torch.zeros(1)}, step / "optimizer.pt")
    (step / "state.json").write_text(json.dumps({"step": 2, "epoch": 0, "batch": 1}))
    (run / "checkpoints" / "latest").write_text("step_000002")
    return run


def test_export_of_a_foreign_training_checkpoint_or_broken_config_names_the_file(tiny, tmp_path):
    tensors = dict(tiny[0].state_dict())
    del tensors["encoder.group_queries"]
    tensors["encoder.extra.weight"] = torch.zeros(2)
    run = _run_dir(tmp_path, tensors)
    weights = run / "checkpoints" / "step_000002" / "trainable.safetensors"
    with pytest.raises(CheckpointError, match=rf"{weights} does not match the run's encoder preset 'tiny' \(sd15, "
                                              r"depth 2, width 64, .*\): 1 missing keys \(e.g. \['encoder.group_queries'"
                                              r"\]\), 1 unexpected keys \(e.g. \['encoder.extra.weight'\]\)"):
        export(run)
    (run / "config.json").write_text("{broken")
    with pytest.raises(ValueError, match=rf"training run config: {run / 'config.json'} is not valid JSON"):
        export(run)
    assert not list(run.glob("*.safetensors")) and not list(run.glob(".*"))


def test_export_writes_a_loadable_file_and_refuses_a_bad_out(tiny, tmp_path):
    run = _run_dir(tmp_path, tiny[0].state_dict())
    path = export(run)
    assert path == run / "customcontrast_step2.safetensors" and checkpoint.load(path)[1].step == 2
    with pytest.raises(ValueError, match=r"--out: expected a file path ending in .safetensors .*found .*model.pt"):
        export(run, out=tmp_path / "model.pt")
    with pytest.raises(ValueError, match=r"--out: .* \(a folder\)"):
        export(run, out=run)


@pytest.mark.parametrize("name, dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_export_dtype_writes_the_weights_in_that_dtype(tiny, tmp_path, name, dtype):
    """``python -m training.export RUN --dtype fp16|bf16``: the file holds the training weights cast to that dtype
    (bit for bit), records it, and has half the tensor bytes of the fp32 export. Fails when export drops its
    ``dtype`` (an fp32 file) and when the CLI does not pass --dtype on."""
    from training.export import main

    run = _run_dir(tmp_path, tiny[0].state_dict())
    full = export(run, out=tmp_path / "fp32.safetensors")
    half = main([str(run), "--out", str(tmp_path / f"{name}.safetensors"), "--dtype", name])
    info = checkpoint.read_info(half)
    assert (checkpoint.read_info(full).dtype, info.dtype, info.step) == ("fp32", name, 2)
    weights, written = tiny[0].state_dict(), load_file(str(half))
    assert written.keys() == weights.keys()
    assert all(written[k].dtype == dtype and torch.equal(written[k], weights[k].to(dtype)) for k in weights)
    values = sum(v.numel() for v in weights.values())
    assert [p.stat().st_size - 8 - struct.unpack("<Q", p.read_bytes()[:8])[0] for p in (full, half)] == \
        [4 * values, 2 * values]
    with pytest.raises(ValueError, match=r"--dtype: expected one of \['bf16', 'fp16', 'fp32'\], found 'fp8'"):
        export(run, dtype="fp8")
    with pytest.raises(SystemExit):
        main([str(run), "--dtype", "int8"])


def test_export_records_the_clip_vision_model_of_the_run(tiny, tmp_path):
    """The exported checkpoint names the CLIP-vision model the run trained with: the tiny random model's
    structure, or a real run's ``paths.clip_vision`` folder with the image and patch sizes of its config.json
    (a CLIPConfig's vision_config too), its name alone when the folder is not on this machine. Fails when export
    does not pass the record on (the file would hold the config's width and layers only)."""
    import dataclasses

    from customcontrast_core.checkpoint import VisionTower
    from training.config import PRESETS, ModelPaths
    from training.models import clip_vision_record

    run = _run_dir(tmp_path, tiny[0].state_dict())
    assert checkpoint.read_info(export(run)).clip_vision == VisionTower(
        hidden_size=64, num_layers=4, image_size=TrainConfig().reference_size, patch_size=8,
        name="tiny random CLIP vision")
    folder = tmp_path / "clip-vit-large-patch14-336"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"vision_config": {"image_size": 336, "patch_size": 14}}))
    real = dataclasses.replace(PRESETS["sd15"], paths=ModelPaths(diffusion="/sd15", clip_vision=str(folder)))
    config = dataclasses.replace(get_preset("sd15"), clip_width=1024, clip_num_layers=24, clip_layers=(8, 16, 24))
    assert clip_vision_record(real, config) == VisionTower(1024, 24, 336, 14, "clip-vit-large-patch14-336")
    (folder / "config.json").unlink()
    assert clip_vision_record(real, config) == VisionTower(1024, 24, name="clip-vit-large-patch14-336")


# Writing: atomic, never non-finite, readable per the umask

@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_follow_the_umask(tiny, tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        path = checkpoint.save(tmp_path / "new" / "m.safetensors", tiny[0])
        run = _run_dir(tmp_path, tiny[0].state_dict())
        exported = export(run)
    finally:
        os.umask(previous)
    assert (path.stat().st_mode & 0o777, exported.stat().st_mode & 0o777) == (mode, mode)
    assert path.parent.stat().st_mode & 0o777 == 0o777 & ~umask


def test_a_write_that_dies_halfway_keeps_the_previous_file(tiny, tmp_path, monkeypatch):
    model, source = tiny
    path = tmp_path / "m.safetensors"
    path.write_bytes(source.read_bytes())

    def half_then_crash(f, head, tensors):
        f.write(source.read_bytes()[:1000])
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(safetensors_file, "_write_file", half_then_crash)
    with pytest.raises(OSError, match=rf"could not write {path}: the disk is full .*; the previous file is kept"):
        checkpoint.save(path, model, step=8)
    assert path.read_bytes() == source.read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    with pytest.raises(OSError, match=r"the disk is full .*; no file was written"):
        checkpoint.save(tmp_path / "other.safetensors", model)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_a_real_failed_write_keeps_the_previous_file(tiny, tmp_path):
    """A file-size limit makes the write itself fail (EFBIG) in a child process, as a full disk would."""
    path = tmp_path / "m.safetensors"
    path.write_bytes(tiny[1].read_bytes())
    script = textwrap.dedent(f"""
        import resource, signal, torch
        from customcontrast_core import CustomContrastModel, get_preset, checkpoint
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        model = CustomContrastModel(get_preset("tiny"))
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
        try:
            checkpoint.save({str(path)!r}, model, step=9)
        except OSError as err:
            print("ERR", err)
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert f"ERR [Errno 27] could not write {path}: File too large" in out.stdout, out.stdout + out.stderr
    assert "the previous file is kept" in out.stdout
    assert path.read_bytes() == tiny[1].read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_readers_and_a_killed_writer_never_see_a_partial_file(tmp_path):
    """A child saves in a loop: every read meanwhile, and after kill -9, finds a complete, loadable file."""
    path = tmp_path / "m.safetensors"
    script = textwrap.dedent(f"""
        from customcontrast_core import CustomContrastModel, get_preset, checkpoint
        model = CustomContrastModel(get_preset("tiny_sdxl"))
        step = 0
        while True:
            step += 1
            checkpoint.save({str(path)!r}, model, step=step)
            if step == 1:
                print("ready", flush=True)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "ready\n"
        steps = set()
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            steps.add(checkpoint.read_info(path).step)
            assert len(load_file(str(path))) == 223
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        child.stdout.close()
    assert len(steps) > 3   # the file was replaced many times while being read
    assert checkpoint.read_info(path).step >= max(steps) and len(load_file(str(path))) == 223


def test_non_finite_weights_are_never_written(tiny, tmp_path):
    model = CustomContrastModel(get_preset("tiny"))
    with torch.no_grad():
        model.encoder.proj_in.weight[0, 0] = float("inf")
    path = tmp_path / "m.safetensors"
    path.write_bytes(tiny[1].read_bytes())
    with pytest.raises(CheckpointError, match=rf"not writing {path}: encoder.proj_in.weight contains NaN or Inf.*"
                                              "previous file there is kept"):
        checkpoint.save(path, model)
    assert path.read_bytes() == tiny[1].read_bytes()


# The same errors through a real ComfyUI's Load node (skipped without COMFYUI_PATH)

def _load_in_comfyui(name):
    from comfy_env import run_prompt
    return run_prompt({"1": {"class_type": "CustomContrastLoader", "inputs": {"checkpoint": name}},
                       "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}})


def test_the_load_node_loads_every_header_length_and_shows_the_loaders_errors(tiny, tmp_path):
    """Through ComfyUI's executor: each malformed file gets the loader's own error; the valid tiny files of every
    header length are read through and then refused as the toy model (that refusal comes after every check of
    the file)."""
    from comfy_env import comfyui
    env = comfyui()
    folder = env.models / "customcontrast"
    header, data = split(tiny[1])
    files = {}
    header["__metadata__"]["extra"] = json.dumps({"pad": ""})
    first = (128 - len(json.dumps(header, separators=(",", ":")))) % 256
    for k in range(8):   # 8 consecutive header lengths from 128 mod 256
        header["__metadata__"]["extra"] = json.dumps({"pad": "x" * (first + k)})
        files[k] = f"faults_pad{k}.safetensors"
        files[k, "n"] = write(folder / files[k], header, data)
    assert files[0, "n"] % 256 == 128
    with open(folder / "faults_model.pt", "wb") as f:
        pickle.dump({"w": 1}, f, protocol=2)
    (folder / "faults_truncated.safetensors").write_bytes(tiny[1].read_bytes()[:-1000])
    with_config(folder / "faults_deep.safetensors", tiny, depth=256)
    with_config(folder / "faults_half.safetensors", tiny, width=64.5)
    env.folder_paths.filename_list_cache.clear() if hasattr(env.folder_paths, "filename_list_cache") else None
    bad = {
        "faults_model.pt": r"faults_model.pt is a pickle / torch.save file \(pickle protocol 2\)",
        "faults_truncated.safetensors": rf"faults_truncated.safetensors is truncated \(incomplete\): expected "
                                        rf"{tiny[1].stat().st_size} bytes as its header declares, found "
                                        rf"{tiny[1].stat().st_size - 1000}",
        "faults_deep.safetensors": r"does not match its config \(sd15, depth 256, .*\): the config implies more "
                                   r"than 294 tensors, the file holds 115",
        "faults_half.safetensors": r"encoder config width: expected an integer in \[1, 65536\], found 64.5",
    }
    for name, message in bad.items():
        ok, _, messages = _load_in_comfyui(name)
        errors = [m[1] for m in messages if m[0] == "execution_error"]
        assert not ok and len(errors) == 1 and errors[0]["exception_type"].endswith("CheckpointError"), messages
        assert re.search(message, errors[0]["exception_message"]), errors[0]["exception_message"]
        assert str(folder) in errors[0]["exception_message"]
    for k in range(8):   # after the errors, the executor still reads every valid file through, header to tensors:
        ok, outputs, messages = _load_in_comfyui(files[k])   # and then refuses the tiny preset, as it must
        errors = [m[1]["exception_message"] for m in messages if m[0] == "execution_error"]
        assert not ok and len(errors) == 1, messages
        assert errors[0].startswith(f"{folder / files[k]} is a checkpoint of the `tiny` preset, the toy test model")
