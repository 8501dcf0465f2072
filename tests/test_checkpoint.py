"""The checkpoint format: round trip and every refusal with a clear message."""
import dataclasses
import json
import pickle
import re
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from customcontrast_core import CustomContrastModel, get_preset
from customcontrast_core import checkpoint, safetensors_file
from customcontrast_core.checkpoint import CheckpointError
from safetensors_edit import rewrite


@pytest.fixture()
def tiny_file(tmp_path):
    torch.manual_seed(0)
    model = CustomContrastModel(get_preset("tiny"))
    return model, checkpoint.save(tmp_path / "tiny.safetensors", model, step=42, extra={"clip": "ViT-tiny"})


def tensor_bytes(path):
    """The bytes after a .safetensors file's header: its tensors' data."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    return path.stat().st_size - 8 - n


def test_round_trip_is_exact(tiny_file):
    model, path = tiny_file
    loaded, info = checkpoint.load(path)
    assert info.config == model.config and info.step == 42 and info.extra == {"clip": "ViT-tiny"}
    assert info.layer_names[0] == "input_1_0" and len(info.layer_names) == 16
    ref, got = model.state_dict(), loaded.state_dict()
    assert ref.keys() == got.keys()
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert all(not p.requires_grad for p in loaded.parameters())
    keys = load_file(str(path)).keys()
    assert "visual_kv.output_11_0.to_k.weight" in keys and all(k.startswith(("encoder.", "visual_kv.")) for k in keys)


def test_round_trip_sdxl_structure(tmp_path):
    model = CustomContrastModel(get_preset("tiny_sdxl"))
    loaded, info = checkpoint.load(checkpoint.save(tmp_path / "x.safetensors", model), expected_base="sdxl")
    assert len(info.layer_names) == 70 and len(loaded.visual_kv) == 70


def test_pickle_is_refused_without_unpickling(tmp_path):
    path = tmp_path / "model.ckpt"
    with path.open("wb") as f:
        pickle.dump({"a": 1}, f)
    with pytest.raises(CheckpointError, match="pickle / torch.save"):
        checkpoint.load(path)
    torch.save({"a": torch.zeros(1)}, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="pickle / torch.save"):
        checkpoint.load(tmp_path / "model.pt")


def test_not_safetensors(tmp_path):
    path = tmp_path / "notes.safetensors"
    path.write_bytes(b"hello world, this is plain text and not a weight file at all")
    with pytest.raises(CheckpointError, match="not a .safetensors file"):
        checkpoint.load(path)
    (tmp_path / "tiny.safetensors").write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="has 3 bytes"):
        checkpoint.load(tmp_path / "tiny.safetensors")
    with pytest.raises(FileNotFoundError, match="no CustomContrast checkpoint"):
        checkpoint.load(tmp_path / "missing.safetensors")


def test_truncated(tiny_file):
    _, path = tiny_file
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=rf"truncated \(incomplete\): expected {len(data)} bytes as its header declares, found {len(data) - 100}"):
        checkpoint.load(path)
    path.write_bytes(data[:50])
    with pytest.raises(CheckpointError, match="truncated"):
        checkpoint.load(path)


def test_wrong_format_name(tiny_file):
    _, path = tiny_file
    rewrite(path, format="ip-adapter")
    with pytest.raises(CheckpointError, match="expected metadata format='customcontrast', found 'ip-adapter'"):
        checkpoint.load(path)


def test_foreign_safetensors_without_metadata(tmp_path):
    path = tmp_path / "ip.safetensors"
    save_file({"image_proj.proj.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(CheckpointError, match="found None"):
        checkpoint.load(path)


def test_newer_version(tiny_file):
    _, path = tiny_file
    rewrite(path, format_version="2")
    with pytest.raises(CheckpointError, match="version 2; this version of CustomContrast reads up to 1"):
        checkpoint.read_info(path)


def test_missing_keys(tiny_file):
    _, path = tiny_file
    tensors = load_file(str(path))
    del tensors["visual_kv.middle_0_0.to_v.weight"]
    rewrite(path, tensors)
    with pytest.raises(CheckpointError, match=r"1 missing keys \(e.g. \['visual_kv.middle_0_0.to_v.weight'\]\)"):
        checkpoint.load(path)


def test_shape_mismatch(tiny_file):
    _, path = tiny_file
    tensors = load_file(str(path))
    tensors["encoder.proj_in.weight"] = torch.zeros(64, 65)
    rewrite(path, tensors)
    with pytest.raises(CheckpointError, match=r"encoder.proj_in.weight has shape \(64, 65\), expected \(64, 64\)"):
        checkpoint.load(path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights(tiny_file, bad):
    _, path = tiny_file
    tensors = load_file(str(path))
    tensors["encoder.layer_embed"][0, 0] = bad
    rewrite(path, tensors)
    with pytest.raises(CheckpointError, match="encoder.layer_embed contains NaN or Inf"):
        checkpoint.load(path)


def test_sdxl_weights_for_sd15_model(tmp_path):
    path = checkpoint.save(tmp_path / "xl.safetensors", CustomContrastModel(get_preset("tiny_sdxl")))
    with pytest.raises(CheckpointError, match="trained for SDXL but the model is SD15"):
        checkpoint.load(path, expected_base="sd15")


def test_clip_width_mismatch(tiny_file):
    _, path = tiny_file
    with pytest.raises(CheckpointError, match="width 64, the one given has width 1280"):
        checkpoint.load(path, expected_clip_width=1280)


def test_metadata_contradicting_config(tiny_file):
    _, path = tiny_file
    rewrite(path, layers=json.dumps(["input_1_0"]))
    with pytest.raises(CheckpointError, match="metadata layers="):
        checkpoint.read_info(path)
    rewrite(path, layers=None, config="{not json")
    with pytest.raises(CheckpointError, match="no valid encoder config"):
        checkpoint.read_info(path)


def test_failed_save_keeps_previous_file(tiny_file, monkeypatch):
    model, path = tiny_file
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(safetensors_file, "_write_file", crash)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(path, model, step=43)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]   # no temporary file left behind


@pytest.mark.parametrize("change, message", [
    (dict(step="abc"), "metadata step must be an integer, found 'abc'"),
    (dict(extra="{oops"), "metadata extra is not valid JSON"),
    (dict(extra="[1, 2]"), "metadata extra must be a JSON object, found list"),
    (dict(format_version="0"), "format_version must be 1..1, found 0"),
    (dict(clip_layers="[2, 3"), "metadata clip_layers is not valid JSON"),
])
def test_malformed_metadata_is_a_checkpoint_error(tiny_file, change, message):
    _, path = tiny_file
    rewrite(path, **change)
    with pytest.raises(CheckpointError, match=message.replace("[", r"\[")):
        checkpoint.read_info(path)


def test_a_header_entry_without_offsets_is_a_checkpoint_error(tiny_file):
    _, path = tiny_file
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    del header["encoder.layer_embed"]["data_offsets"]
    text = json.dumps(header).encode().ljust(n)
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])
    with pytest.raises(CheckpointError, match="entry 'encoder.layer_embed' lacks dtype, shape or data_offsets"):
        checkpoint.read_info(path)


@pytest.mark.parametrize("dtype", [torch.int32, torch.float16])
def test_tensors_in_a_foreign_or_mixed_dtype_are_refused(tiny_file, dtype):
    """An int tensor would fail inside load_state_dict, one fp16 tensor among fp32 at the first forward."""
    _, path = tiny_file
    tensors = load_file(str(path))
    tensors["encoder.proj_in.weight"] = tensors["encoder.proj_in.weight"].to(dtype)
    rewrite(path, tensors)
    with pytest.raises(CheckpointError, match="expected every tensor in one floating-point dtype"):
        checkpoint.load(path)


def test_a_checkpoint_in_one_half_dtype_loads(tmp_path):
    model = CustomContrastModel(get_preset("tiny")).to(torch.bfloat16)
    loaded, _ = checkpoint.load(checkpoint.save(tmp_path / "bf16.safetensors", model))
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())


@pytest.mark.parametrize("name, dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_a_half_precision_save_loads_as_the_fp32_weights_cast_in_half_the_bytes(tiny_file, tmp_path, name, dtype):
    """save(dtype=fp16/bf16) of an fp32 model: every loaded tensor is the fp32 weight cast to that dtype, bit for
    bit and in that dtype; the metadata records it; the file takes half the bytes (header aside). Fails when save
    ignores ``dtype`` (the fp32 tensors contradict the recorded dtype, and the size is not halved)."""
    model, full = tiny_file
    half = checkpoint.save(tmp_path / f"{name}.safetensors", model, step=42, dtype=dtype)
    loaded, info = checkpoint.load(half)
    assert info.dtype == name and checkpoint.read_info(full).dtype == "fp32"
    ref, got = model.state_dict(), loaded.state_dict()
    assert ref.keys() == got.keys()
    for key in ref:
        assert got[key].dtype == dtype and torch.equal(got[key], ref[key].to(dtype)), key
    values = sum(v.numel() for v in ref.values())
    assert (tensor_bytes(full), tensor_bytes(half)) == (4 * values, 2 * values)
    assert 0.49 < half.stat().st_size / full.stat().st_size < 0.52


def test_fp16_overflow_and_a_dtype_contradicting_the_tensors_are_refused(tiny_file, tmp_path):
    """A weight beyond fp16's range is refused before anything is written (fails without the check after the
    cast: the file would hold inf); metadata dtype='fp16' on fp32 tensors is refused on reading (fails without
    the comparison of the recorded dtype with the header)."""
    model, path = tiny_file
    with torch.no_grad():
        model.encoder.proj_in.weight[0, 0] = 1e5
    out = tmp_path / "over.safetensors"
    with pytest.raises(CheckpointError, match=r"not writing .*over.safetensors in fp16: encoder.proj_in.weight holds "
                                              r"values up to 1e\+05, beyond fp16's range \(6.55e\+04\); write it as bf16"):
        checkpoint.save(out, model, dtype=torch.float16)
    assert not out.exists()
    checkpoint.load(checkpoint.save(out, model, dtype=torch.bfloat16))   # bf16 has fp32's range
    with pytest.raises(ValueError, match=r"checkpoint dtype: expected one of .*found torch.int8"):
        checkpoint.save(out, model, dtype=torch.int8)
    rewrite(path, dtype="fp16")
    with pytest.raises(CheckpointError, match=r"metadata dtype='fp16' contradicts its tensors, stored as \['F32'\]"):
        checkpoint.read_info(path)
    rewrite(path, dtype=None)   # a file written before the field: the tensors' dtype
    assert checkpoint.read_info(path).dtype == "fp32"


def test_the_clip_vision_record_round_trips_and_must_fit_the_config(tiny_file, tmp_path):
    """The CLIP-vision model a checkpoint was trained with is recorded and read back; without one, save records
    what the config knows (width, layers); a file written before the record reads as None. A record whose width or
    layer count contradicts the config is refused on writing and on reading (the reading half fails when
    ``_clip_vision`` drops its comparison with the config)."""
    model, path = tiny_file
    tower = checkpoint.VisionTower(hidden_size=64, num_layers=4, image_size=32, patch_size=8, name="tiny clip")
    out = checkpoint.save(tmp_path / "t.safetensors", model, clip_vision=tower)
    assert checkpoint.read_info(out).clip_vision == tower
    assert checkpoint.read_info(path).clip_vision == checkpoint.VisionTower(64, 4)   # saved without a record
    assert tower.describe() == "'tiny clip' (width 64, 4 layers, 32 px, patch 8)"
    assert tower.differences(checkpoint.VisionTower(64, 4, 224, 14)) == ["image size 32 vs 224", "patch size 8 vs 14"]
    assert tower.differences(checkpoint.VisionTower(64, 4)) == []                    # unknown fields never differ
    with pytest.raises(ValueError, match=r"clip_vision: expected a CLIP-vision model of width 64 with 4 layers \(the "
                                         r"encoder config's\), found \(width 1280, 32 layers\)"):
        checkpoint.save(out, model, clip_vision=checkpoint.VisionTower(1280, 32))
    rewrite(out, clip_vision=None)
    assert checkpoint.read_info(out).clip_vision is None
    rewrite(out, clip_vision=checkpoint.VisionTower(1024, 4, name="vit-l").to_json())
    with pytest.raises(CheckpointError, match=r"metadata clip_vision 'vit-l' \(width 1024, 4 layers\) contradicts its "
                                              r"config \(CLIP-vision width 64, 4 layers\)"):
        checkpoint.read_info(out)
    rewrite(out, clip_vision=json.dumps({"hidden_size": 64, "num_layers": 4, "image_size": 0}))
    with pytest.raises(CheckpointError, match=r"metadata clip_vision is not a CLIP-vision record \(CLIP-vision record "
                                              r"image_size: expected an integer from 1 to 65536 or null, found 0\)"):
        checkpoint.read_info(out)


@pytest.mark.parametrize("preset", ["tiny", "tiny_sdxl"])
def test_check_real_refuses_a_tiny_preset_saying_it_is_the_toy_test_model(tmp_path, preset):
    """A tiny-preset checkpoint (and any other config with toy UNet widths) is refused by name, with the real
    presets expected; sd15, sdxl and real-width configs with small encoders pass. Fails when ``toy_model`` reports
    nothing (the Loader would pass the toy on to fail later at Encode Subject)."""
    from customcontrast_core.config import toy_model

    path = tmp_path / "toy.safetensors"
    config = get_preset(preset)
    base = {"tiny": "SD1.5", "tiny_sdxl": "SDXL"}[preset]
    with pytest.raises(CheckpointError, match=rf"{path} is a checkpoint of the `{preset}` preset, the toy test model: "
                                              rf"it cannot draw on a real SD1.5 or SDXL model \(its UNet widths are "
                                              rf"{re.escape(str(config.block_out_channels))}, {base}'s are .*"
                                              r"Expected a checkpoint of a real preset \(sd15 or sdxl\)"):
        checkpoint.check_real(path, config)
    variant = dataclasses.replace(config, depth=3)
    assert toy_model(variant).startswith("a toy model: ")
    for real in ("sd15", "sdxl"):
        checkpoint.check_real(path, get_preset(real))
        checkpoint.check_real(path, dataclasses.replace(get_preset(real), width=64, heads=4, dim_head=16, depth=1))


def test_short_and_foreign_files(tmp_path):
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x80\x02")
    with pytest.raises(CheckpointError, match=r"pickle protocol 2"):
        checkpoint.load(path)
    path.write_bytes(b"\x80\x00\x00")
    with pytest.raises(CheckpointError, match=rf"{path} has 3 bytes; a .safetensors file has at least 8"):
        checkpoint.load(path)
    path.write_bytes(struct.pack("<Q", 100) + b"[1, 2]" + b" " * 94)
    with pytest.raises(CheckpointError, match=r"expected an 8-byte little-endian header length and a JSON header "
                                              r"starting with '\{', found the bytes b'd\\x00.*\['"):
        checkpoint.load(path)
    path.write_bytes(struct.pack("<Q", 2**30) + b"{")
    with pytest.raises(CheckpointError, match=rf"header of {2**30} bytes; .* at most {16 * 2**20} bytes"):
        checkpoint.load(path)


def test_expected_shapes_equal_the_modules_state_dict():
    tiny = get_preset("tiny")
    configs = [get_preset(name) for name in ("tiny", "tiny_sdxl", "sd15", "sdxl")] + [
        dataclasses.replace(tiny, depth=3, ff_mult=2, heads=2, dim_head=8, num_visual_tokens=7, clip_layers=(1, 4),
                            token_widths=(24,), context_dim=40, cls_dim=12, fourier_dim=10, clip_width=48),
    ]
    for config in configs:
        ref = {k: tuple(v.shape) for k, v in CustomContrastModel(config, device=torch.device("meta")).state_dict().items()}
        shapes = list(checkpoint.expected_shapes(config))
        assert len(shapes) == len(ref) and dict(shapes) == ref
