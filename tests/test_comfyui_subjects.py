"""Save Subject / Load Subject and per-image weights inside a real ComfyUI (COMFYUI_PATH; skipped without it)."""
import shutil

import pytest
import torch

from comfy_env import run_prompt
from test_comfyui_nodes import apply, encode, env, files, loaded, photo, prompt_for, sample  # noqa: F401 (fixtures)


def node(env, node_id):
    return env.nodes.NODE_CLASS_MAPPINGS[node_id]


def save(env, subject, prefix="cc_tests/dog"):
    """Runs Save Subject; returns the written file's path."""
    out = node(env, "CustomContrastSaveSubject").execute(subject, prefix)
    return env.folder_paths.get_output_directory() + "/" + out.ui["text"][0]


def test_a_saved_and_loaded_subject_is_the_encoded_one_and_samples_the_same(env, files, loaded, photo):
    """Encode -> Save Subject (output folder) -> copied to the input folder -> Load Subject gives the encoded
    features bit for bit (and what they were encoded for), and Apply samples exactly the same latents with it.
    Fails when Load Subject hands the saved ``blank`` on as ``hidden`` (or the reverse)."""
    encoded = encode(env, loaded, photo)
    written = save(env, encoded)
    assert written.endswith("_.safetensors") and "/cc_tests/dog_" in written
    shutil.copy(written, env.input_dir / "cc_dog_subject.safetensors")
    restored = node(env, "CustomContrastLoadSubject").execute(loaded["customcontrast"],
                                                              "cc_dog_subject.safetensors").result[0]
    assert torch.equal(restored.hidden, encoded.hidden) and torch.equal(restored.blank, encoded.blank)
    assert (restored.width, restored.layers, restored.clip_vision, restored.images) == \
        (encoded.width, encoded.layers, encoded.clip_vision, 1)
    negative = env.nodes.CLIPTextEncode().encode(loaded["clip"], "")[0]
    a = sample(env, *apply(env, loaded, encoded), negative)
    b = sample(env, *apply(env, loaded, restored), negative)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the same through ComfyUI's executor: Load Subject in place of Encode Subject (validation, cache fingerprint)
    prompt = prompt_for(files, "sd15_single_subject")
    prompt["5"] = {"class_type": "CustomContrastLoadSubject",
                   "inputs": {"customcontrast": ["4", 0], "subject_file": "cc_dog_subject.safetensors"}}
    ok, outputs, messages = run_prompt(prompt)
    assert ok and outputs["11"]["images"], messages
    prompt["5"]["inputs"]["subject_file"] = "no_such_subject.safetensors"
    ok, outputs, _ = run_prompt(prompt)
    assert not ok and "no_such_subject.safetensors' is not a file in the input folder" in str(outputs)


def test_load_subject_refuses_a_subject_of_other_clip_vision_features_and_a_checkpoint_file(env, files, loaded):
    """A subject encoded for a ViT-H/14 checkpoint (width 1280) is refused with the test checkpoint (ViT-L/14,
    1024), naming both; a checkpoint file given as a subject is refused as such. Fails when Load Subject does not
    check the subject against the CUSTOMCONTRAST input (the ViT-H subject would load)."""
    from customcontrast_core.checkpoint import VisionTower
    from customcontrast_core.subjects import SavedSubject, save_subject

    vith = VisionTower(1280, 32, 224, 14, "clip-vit-h-14")
    save_subject(env.input_dir / "cc_vith_subject.safetensors",
                 SavedSubject(hidden=torch.zeros(1, 3, 257, 1280), blank=torch.zeros(1, 3, 257, 1280),
                              clip_layers=(11, 22, 32), clip_vision=vith, preset="sd15"))
    load = node(env, "CustomContrastLoadSubject")
    with pytest.raises(ValueError, match=r"cc_vith_subject.safetensors was encoded with a checkpoint of the `sd15` "
                                         r"preset and CLIP-vision model 'clip-vit-h-14' \(width 1280, 32 layers, 224 px, "
                                         r"patch 14\); the CUSTOMCONTRAST given \(`custom` preset\) reads \(width 1024, "
                                         r"24 layers\): CLIP-vision width 1280 and layers \(11, 22, 32\) here, 1024 and "
                                         r"\(8, 16, 24\) for the checkpoint; width 1280 vs 1024"):
        load.execute(loaded["customcontrast"], "cc_vith_subject.safetensors")
    shutil.copy(env.models / "customcontrast" / files["customcontrast"], env.input_dir / "cc_model.safetensors")
    with pytest.raises(ValueError, match=r"cc_model.safetensors is not a saved CustomContrast subject: .*found "
                                         r"'customcontrast' \(a CustomContrast checkpoint: load it with Load "
                                         r"CustomContrast Model\)"):
        load.execute(loaded["customcontrast"], "cc_model.safetensors")


def test_image_weights_weigh_the_average_of_several_references(env, loaded, photo):
    """Two references with image_weights '1, 3' give (f1 + 3 f2) / 4 of their separately encoded features,
    '1, 0' the first alone; a count other than the images' and weights with average off are refused. Fails when
    Encode Subject ignores image_weights (the plain mean of the two)."""
    flipped = photo.flip(2)
    both = torch.cat([photo, flipped])
    first, second = encode(env, loaded, photo), encode(env, loaded, flipped)
    weighted = encode(env, loaded, both, image_weights="1, 3")
    torch.testing.assert_close(weighted.hidden, (first.hidden + 3 * second.hidden) / 4, rtol=1e-5, atol=1e-4)
    assert (weighted.images, weighted.image_weights) == (2, (1.0, 3.0))
    torch.testing.assert_close(encode(env, loaded, both, image_weights="1, 0").hidden, first.hidden, rtol=1e-5,
                               atol=1e-4)
    with pytest.raises(ValueError, match=r"CustomContrast Encode Subject: image_weights gives 3 weight\(s\) for 2 "
                                         r"image\(s\)"):
        encode(env, loaded, both, image_weights="1, 2, 3")
    with pytest.raises(ValueError, match=r"image_weights is set \('1, 2'\) but average is off, so only the first "
                                         r"image is used"):
        encode(env, loaded, both, image_weights="1, 2", average=False)


def test_the_saved_subject_workflow_saves_on_the_first_run_and_samples_from_the_file_on_the_next(env, files):
    """The sd15_saved_subject API workflow as its note tells users to run it: queued once, Save Subject writes the
    subject (Load Subject's file does not exist yet, so ComfyUI runs only that branch); the written file copied to
    the input folder under Load Subject's name, queued again, it samples an image. Fails when Apply does not take
    its subject from Load Subject, or when Save Subject is missing or its file does not load."""
    prompt = prompt_for(files, "sd15_saved_subject")
    assert prompt["6"]["inputs"]["subject"] == ["26", 0] and prompt["25"]["inputs"]["subject"] == ["5", 0]
    target = env.input_dir / prompt["26"]["inputs"]["subject_file"]
    target.unlink(missing_ok=True)
    ok, outputs, messages = run_prompt(prompt)
    assert ok and set(outputs) == {"25"}, (outputs, messages)      # the first run: only the subject is saved
    written = env.folder_paths.get_output_directory() + "/" + outputs["25"]["text"][0]
    shutil.copy(written, target)                                    # what the note tells the user to do
    ok, outputs, messages = run_prompt(prompt)
    errors = [m[1].get("exception_message") for m in messages if m[0] == "execution_error"]
    assert ok and outputs["11"]["images"][0]["type"] == "output", (outputs, errors)
    target.unlink()
