"""TrainConfig checks every field's type and range when built; --set values; what may change on resume."""
import dataclasses
import json

import pytest

from training.config import PRESETS, ModelPaths, TrainConfig, resume_mismatch
from training.run import parse_config


@pytest.mark.parametrize("field, value, message", [
    ("steps", "100", "TrainConfig.steps: expected an integer, found str '100'"),
    ("steps", 2.5, "TrainConfig.steps: expected an integer, found float 2.5"),
    ("batch_size", True, "TrainConfig.batch_size: expected an integer, found bool True"),
    ("lr", "abc", "TrainConfig.lr: expected a finite number, found str 'abc'"),
    ("augment", "False", "TrainConfig.augment: expected a bool (true or false), found str 'False'"),
    ("augment", 1, "TrainConfig.augment: expected a bool (true or false), found int 1"),
    ("data", None, "TrainConfig.data: expected a string, found NoneType None"),
    ("contrastive_terms", "cscl", "TrainConfig.contrastive_terms: expected a list of str, found str 'cscl'"),
    ("capture_downsample", 3, "TrainConfig.capture_downsample: expected a list of int, found int 3"),
    ("capture_downsample", [2, "4"], "TrainConfig.capture_downsample[1]: expected an integer, found str '4'"),
    ("paths", "x", "TrainConfig.paths: expected a ModelPaths or a JSON object of paths, found str 'x'"),
    ("encoder_preset", "nope", "TrainConfig.encoder_preset: expected one of ['sd15', 'sdxl', 'tiny', 'tiny_sdxl'], "
                               "found 'nope'"),
    ("r_min", 0, "TrainConfig.r_min: expected 0 < r_min <= 1 (clamp of a cosine, inverted), found 0.0"),
    ("r_min", 1.5, "TrainConfig.r_min: expected 0 < r_min <= 1 (clamp of a cosine, inverted), found 1.5"),
    ("macl_temperature", 0, "TrainConfig.macl_temperature: expected a number > 0, found 0.0"),
    ("cscl_temperature", -1, "TrainConfig.cscl_temperature: expected a number > 0, found -1.0"),
    ("lr", 0, "TrainConfig.lr: expected a number > 0, found 0.0"),
    ("lambda_loc", -1e-3, "TrainConfig.lambda_loc: expected a number >= 0, found -0.001"),
    ("drop_text", 1.5, "TrainConfig.drop_text: expected a rate in [0, 1], found 1.5"),
    ("drop_image", -0.1, "TrainConfig.drop_image: expected a rate in [0, 1], found -0.1"),
    ("batch_size", 1, "TrainConfig.batch_size: expected >= 2 (the contrastive losses need in-batch negatives), "
                      "found 1"),
    ("steps", 0, "TrainConfig.steps: expected a positive integer, found 0"),
    ("num_workers", -1, "TrainConfig.num_workers: expected >= 0, found -1"),
    ("synthetic_views", 1, "TrainConfig.synthetic_views: expected >= 2, found 1"),
    ("contrastive_terms", ["cscl", "cscl"], "TrainConfig.contrastive_terms: expected distinct names among "
                                            "('cscl', 'macl'), found ('cscl', 'cscl')"),
    ("contrastive_terms", ["clip"], "TrainConfig.contrastive_terms: expected distinct names among ('cscl', 'macl'), "
                                    "found ('clip',)"),
    ("capture_downsample", [3], "TrainConfig.capture_downsample: expected downsample factors of tiny cross-attention "
                                "layers, among [1, 2, 4, 8], found (3,)"),
    ("capture_downsample", [], "TrainConfig.capture_downsample: expected at least one factor while lambda_loc > 0 "
                               "(no captured layer makes L_loc 0), found ()"),
    ("optimizer", "adam", "TrainConfig.optimizer: expected 'adamw' or 'sgd', found 'adam'"),
])
def test_fields_are_checked_when_built(field, value, message):
    with pytest.raises(ValueError) as err:
        TrainConfig(**{field: value})
    assert str(err.value) == message


def test_dropout_sum_model_paths_and_conversions():
    with pytest.raises(ValueError) as err:
        TrainConfig(drop_image=0.5, drop_text=0.5, drop_both=0.5)
    assert str(err.value) == "TrainConfig.drop_image + drop_text + drop_both: expected at most 1, found 1.5"
    with pytest.raises(ValueError, match=r"unknown TrainConfig.paths fields \['clip_vison'\]"):
        TrainConfig(paths={"clip_vison": "x"})
    with pytest.raises(ValueError) as err:
        ModelPaths(diffusion=3)
    assert str(err.value) == "TrainConfig.paths.diffusion: expected a path string, found int 3"
    with pytest.raises(ValueError, match=r"^TrainConfig.capture_downsample: .* among \[2, 4\], found \(1,\)$"):
        TrainConfig(encoder_preset="tiny_sdxl", capture_downsample=(1,))
    cfg = TrainConfig(steps=2e5, lr=1, capture_downsample=[4.0], contrastive_terms=["macl"], lambda_loc=0,
                      paths={"clip_vision": "v"})
    assert (cfg.steps, type(cfg.steps), cfg.lr, type(cfg.lr)) == (200_000, int, 1.0, float)
    assert cfg.capture_downsample == (4,) and cfg.contrastive_terms == ("macl",)
    assert cfg.paths == ModelPaths(clip_vision="v")
    assert TrainConfig(capture_downsample=(), lambda_loc=0).capture_downsample == ()
    assert TrainConfig.from_dict(json.loads(PRESETS["sd15"].to_json())) == PRESETS["sd15"]


def test_set_accepts_json_and_python_booleans(capsys):
    cfg, _ = parse_config(["--set", "augment=False", "--set", "gradient_checkpointing=True", "--set", "tiny_models=true",
                           "--set", "lr=1e-4", "--set", "mixed_precision=bf16", "--set", "capture_downsample=[4]"])
    assert (cfg.augment, cfg.gradient_checkpointing, cfg.tiny_models) == (False, True, True)
    assert (cfg.lr, cfg.mixed_precision, cfg.capture_downsample) == (1e-4, "bf16", (4,))
    with pytest.raises(SystemExit) as err:
        parse_config(["--set", "augment=yes"])
    assert err.value.code == 2
    assert "error: TrainConfig.augment: expected a bool (true or false), found str 'yes'" in capsys.readouterr().err


def test_resume_mismatch_names_fields_that_change_the_run():
    saved = json.loads(TrainConfig().to_json())
    grown = dataclasses.replace(TrainConfig(), steps=300, save_every=7, num_workers=2, output_dir="elsewhere",
                                gradient_checkpointing=True)
    assert resume_mismatch(saved, grown) == []
    changed = dataclasses.replace(TrainConfig(), batch_size=8, seed=1, grad_accum=2, encoder_preset="tiny_sdxl",
                                  paths=ModelPaths(clip_vision="v"))
    assert resume_mismatch(saved, changed) == [
        "batch_size: 4 -> 8", "encoder_preset: 'tiny' -> 'tiny_sdxl'", "grad_accum: 1 -> 2",
        "paths: {'appearance_model': 'ViT-B-32', 'appearance_weights': '', 'clip_vision': '', 'diffusion': '', "
        "'diffusion_config': ''} -> {'appearance_model': 'ViT-B-32', 'appearance_weights': '', 'clip_vision': 'v', "
        "'diffusion': '', 'diffusion_config': ''}", "seed: 0 -> 1"]
    del saved["allow_unmasked"], saved["allow_single_view"]   # saved before the fields existed: their defaults
    assert resume_mismatch(saved, TrainConfig()) == []
    # permissions, not data: a run made before the data checks resumes with them granted
    assert resume_mismatch(saved, TrainConfig(allow_unmasked=True, allow_single_view=True)) == []
    assert resume_mismatch(saved, TrainConfig(allow_unmasked=True, lr=1e-4)) == ["lr: 0.001 -> 0.0001"]


def test_a_run_saved_before_loc_maps_existed_resumes_only_with_its_text_only_l_loc():
    """Mutation caught: reading a missing field at today's default ("combined") silently changes L_loc on resume."""
    saved = json.loads(TrainConfig().to_json())
    del saved["loc_maps"]
    assert resume_mismatch(saved, TrainConfig()) == ["loc_maps: 'text' -> 'combined'"]
    assert resume_mismatch(saved, TrainConfig(loc_maps="text")) == []
    saved["loc_maps"] = "combined"
    assert resume_mismatch(saved, TrainConfig()) == []


def test_a_removed_field_is_dropped_with_a_logged_note(tmp_path, caplog):
    """Config files and saved runs written before ``cuda_graphs`` was removed still load, to the same config."""
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"lr": 1e-4, "cuda_graphs": True}))
    with caplog.at_level("WARNING", logger="training.config"):
        cfg = TrainConfig.from_file(path)
    assert cfg == TrainConfig(lr=1e-4)
    assert "'cuda_graphs' (True) is ignored" in caplog.text
    with pytest.raises(ValueError, match=r"unknown training config fields \['cuda_graph'\]"):
        TrainConfig.from_dict({"cuda_graph": True})   # a misspelt field is still refused
