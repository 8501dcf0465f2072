"""Saved subjects (customcontrast_core.subjects): round trip, every refusal, the fit to a checkpoint, and the
weighted average of several references."""
import dataclasses
import json
import pickle

import pytest
import torch
from safetensors.torch import load_file

from customcontrast_core import CustomContrastModel, checkpoint, get_preset
from customcontrast_core.checkpoint import CheckpointError, VisionTower
from customcontrast_core.subjects import (FORMAT_VERSION, SavedSubject, check_fits, image_weights, load_subject,
                                          save_subject, weighted_mean)
from safetensors_edit import rewrite

VITH = VisionTower(1280, 32, 224, 14, "clip-vit-h-14")


def subject(width=1280, layers=(11, 22, 32), tokens=257, tower=VITH, **kw):
    torch.manual_seed(0)
    return SavedSubject(hidden=torch.randn(1, len(layers), tokens, width), blank=torch.randn(1, len(layers), tokens,
                        width), clip_layers=layers, clip_vision=tower, **kw)


def test_a_saved_subject_loads_bit_for_bit_with_what_it_was_encoded_for(tmp_path):
    """hidden and blank come back exactly (fp32, each under its own name) with the preset, base, layers,
    CLIP-vision record, token shape and averaging weights. Fails when save writes ``blank`` under ``hidden``'s
    name (or the reverse)."""
    saved = subject(preset="sdxl", base="sdxl", images=2, image_weights=(1.0, 0.5))
    path = save_subject(tmp_path / "dog.safetensors", saved)
    loaded = load_subject(path)
    assert loaded.hidden.dtype == loaded.blank.dtype == torch.float32
    assert torch.equal(loaded.hidden, saved.hidden) and torch.equal(loaded.blank, saved.blank)
    assert (loaded.clip_layers, loaded.clip_vision, loaded.preset, loaded.base, loaded.images, loaded.image_weights) \
        == ((11, 22, 32), VITH, "sdxl", "sdxl", 2, (1.0, 0.5))
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["token_shape"]) == [3, 257, 1280] and meta["format"] == "customcontrast_subject"
    assert meta["format_version"] == str(FORMAT_VERSION)


def test_a_file_that_is_not_a_good_subject_is_refused_saying_what_was_expected(tmp_path):
    """A checkpoint, a pickle, a newer version, a missing or extra tensor, a shape other than the metadata's, a
    wrong dtype, NaN values and malformed metadata each give a CheckpointError naming the file. The missing-tensor
    case fails when ``load_subject`` drops its check of the tensor names (a KeyError deep inside)."""
    path = save_subject(tmp_path / "s.safetensors", subject(width=64, layers=(2, 3, 4), tokens=5,
                                                            tower=VisionTower(64, 4, 32, 8)))
    good = load_file(str(path))
    model_file = checkpoint.save(tmp_path / "model.safetensors", CustomContrastModel(get_preset("tiny")))
    with pytest.raises(CheckpointError, match=r"model.safetensors is not a saved CustomContrast subject: expected "
                                              r"metadata format='customcontrast_subject', found 'customcontrast' \(a "
                                              r"CustomContrast checkpoint: load it with Load CustomContrast Model\)"):
        load_subject(model_file)
    pickled = tmp_path / "s.pt"
    pickled.write_bytes(pickle.dumps({"hidden": 1}, protocol=4))
    with pytest.raises(CheckpointError, match=r"pickle / torch.save file \(pickle protocol 4\)"):
        load_subject(pickled)
    cases = [
        (dict(format_version="2"), {}, r"subject format version 2; this version of CustomContrast reads 1 to 1 \(update"),
        ({}, {"hidden": good["hidden"]}, r"expected the tensors \['blank', 'hidden'\], found \['hidden'\] \(missing "
                                         r"\['blank'\]"),
        ({}, {**good, "extra": torch.zeros(1)}, r"unexpected \['extra'\]"),
        (dict(token_shape="[3, 6, 64]"), {}, r"tensor 'blank' must be F32 of shape \[1, 3, 6, 64\] \(the metadata's "
                                             r"token_shape\), found F32 of shape \[1, 3, 5, 64\]"),
        (dict(token_shape="[2, 5, 64]"), {}, r"metadata token_shape \[2, 5, 64\] contradicts its 3 clip_layers"),
        ({}, {k: v.half() for k, v in good.items()}, r"must be F32 of shape \[1, 3, 5, 64\] .*found F16"),
        ({}, {**good, "hidden": good["hidden"].clone().index_fill_(2, torch.tensor([1]), float("nan"))},
         r"hidden contains NaN or infinite values"),
        (dict(clip_layers="[2, 3"), {}, r"metadata clip_layers must be a JSON list of integers, found '\[2, 3'"),
        (dict(clip_vision=None), {}, r"metadata clip_vision is not a CLIP-vision record"),
    ]
    for meta, tensors, message in cases:
        bad = tmp_path / "bad.safetensors"
        bad.write_bytes(path.read_bytes())
        rewrite(bad, tensors or None, **meta)
        with pytest.raises(CheckpointError, match=message):
            load_subject(bad)
    with pytest.raises(CheckpointError, match=r"not writing .*: hidden must have shape \(1, 3, T, 64\)"):
        save_subject(tmp_path / "x.safetensors", dataclasses.replace(subject(64, (2, 3, 4), 5), clip_vision=VisionTower(
            64, 4), hidden=torch.zeros(2, 3, 5, 64)))


def test_a_subject_fits_checkpoints_that_read_the_same_clip_vision_features(tmp_path):
    """A subject encoded for sd15 (ViT-H/14, layers 11, 22, 32) fits an sdxl checkpoint (the same features); one of
    the tiny preset, or of another CLIP-vision model (a 336 px record), is refused naming both sides. Fails when
    ``check_fits`` ignores the CLIP-vision records (the 336 px subject would pass)."""
    path = tmp_path / "s.safetensors"
    sd15 = subject(preset="sd15")
    check_fits(path, sd15, get_preset("sdxl"), VITH)
    check_fits(path, sd15, get_preset("sdxl"), None)          # a checkpoint without a record: width and layers
    tiny = subject(width=64, layers=(2, 3, 4), tokens=5, tower=VisionTower(64, 4, 32, 8), preset="tiny")
    with pytest.raises(CheckpointError, match=r"s.safetensors was encoded with a checkpoint of the `tiny` preset and "
                                              r"CLIP-vision model \(width 64, 4 layers, 32 px, patch 8\); the "
                                              r"CUSTOMCONTRAST given \(`sd15` preset\) reads 'clip-vit-h-14' \(width "
                                              r"1280, 32 layers, 224 px, patch 14\): CLIP-vision width 64 and layers "
                                              r"\(2, 3, 4\) here, 1280 and \(11, 22, 32\) for the checkpoint"):
        check_fits(path, tiny, get_preset("sd15"), VITH)
    large = subject(tower=dataclasses.replace(VITH, image_size=336, name="vit-h-336"), tokens=577, preset="sd15")
    with pytest.raises(CheckpointError, match=r"image size 336 vs 224 \(subject vs checkpoint\)\. Encode the subject "
                                              r"again with this checkpoint and its CLIP-vision model"):
        check_fits(path, large, get_preset("sd15"), VITH)


def test_image_weights_are_one_finite_non_negative_number_per_image_and_weigh_the_mean():
    """'1.0, 0.5' weighs two references 2:1 (normalised by their sum); empty means equal weights; a wrong count,
    a negative, NaN or non-numeric entry and all zeros are refused naming the input. Fails when ``weighted_mean``
    does not divide by the weights' sum (the features would be scaled by 1.5)."""
    hidden = torch.stack([torch.full((2, 3, 4), 1.0), torch.full((2, 3, 4), 4.0)])   # (B=2, K, T, D)
    assert image_weights("", 2) is None and image_weights("  ", 3) is None
    assert image_weights("1.0, 0.5", 2) == [1.0, 0.5] and image_weights("2,0", 2) == [2.0, 0.0]
    torch.testing.assert_close(weighted_mean(hidden, [1.0, 0.5]), torch.full((1, 2, 3, 4), 2.0), rtol=0, atol=1e-6)
    torch.testing.assert_close(weighted_mean(hidden, [3.0, 3.0]), weighted_mean(hidden, None), rtol=0, atol=1e-6)
    assert torch.equal(weighted_mean(hidden, None), hidden.mean(0, keepdim=True))
    for text, count, message in [("1.0", 2, r"image_weights gives 1 weight\(s\) for 2 image\(s\): give one per image "
                                            r"\(e.g. '1.0, 1.0'\)"),
                                 ("1, -1", 2, r"finite numbers of at least 0, found '-1'"),
                                 ("1, nan", 2, r"found 'nan'"),
                                 ("1; 2", 2, r"comma-separated numbers such as '1.0, 0.5', found '1; 2'"),
                                 ("0, 0", 2, r"image_weights are all zero")]:
        with pytest.raises(ValueError, match=message):
            image_weights(text, count)
