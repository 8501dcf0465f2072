"""The nodes inside a real ComfyUI (COMFYUI_PATH): registration, patch firing, workflows, bad input."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from comfy_env import comfyui, model_files, run_prompt

REPO = Path(__file__).resolve().parents[1]
DREAMBENCH = REPO.parent / "shared" / "data" / "dreambench"
NODE_IDS = ["CustomContrastLoader", "CustomContrastEncodeSubject", "CustomContrastApply", "CustomContrastMaskPreview",
            "CustomContrastSaveSubject", "CustomContrastLoadSubject"]


@pytest.fixture(scope="module")
def env():
    return comfyui()


@pytest.fixture(scope="module")
def files(env):
    names = model_files()
    photo = DREAMBENCH / "dog" / "00.jpg"
    if not photo.exists():
        pytest.skip(f"reference photo {photo} missing")
    shutil.copy(photo, env.input_dir / "subject.png")
    shutil.copy(DREAMBENCH / "cat" / "00.jpg", env.input_dir / "subject2.png")
    return names


@pytest.fixture(scope="module")
def loaded(env, files):
    """The models as ComfyUI's own loader nodes return them."""
    model, clip, vae = env.nodes.CheckpointLoaderSimple().load_checkpoint(files["checkpoint"])[:3]
    clip_vision = env.nodes.CLIPVisionLoader().load_clip(files["clip_vision"])[0]
    cc = env.nodes.NODE_CLASS_MAPPINGS["CustomContrastLoader"].execute(files["customcontrast"]).result[0]
    return dict(model=model, clip=clip, vae=vae, clip_vision=clip_vision, customcontrast=cc)


def test_nodes_are_registered_with_tooltips(env):
    for node_id in NODE_IDS:
        cls = env.nodes.NODE_CLASS_MAPPINGS[node_id]
        schema = cls.define_schema()
        assert schema.category == "CustomContrast"
        assert all(getattr(i, "tooltip", None) for i in schema.inputs), node_id


def prompt_for(files, name, size=64, steps=2):
    prompt = json.loads((REPO / "workflows" / "api" / f"{name}.json").read_text())
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = files["checkpoint"]
        elif node["class_type"] == "CLIPVisionLoader":
            inputs["clip_name"] = files["clip_vision"]
        elif node["class_type"] == "CustomContrastLoader":
            inputs["checkpoint"] = files["customcontrast"]
        elif node["class_type"] == "EmptyLatentImage":
            inputs.update(width=size, height=size)
        elif node["class_type"] == "KSampler":
            inputs["steps"] = steps
    return prompt


@pytest.mark.parametrize("name", ["sd15_single_subject", "sd15_two_subjects", "sd15_mask_preview"])
def test_api_workflows_execute(files, name):
    ok, outputs, messages = run_prompt(prompt_for(files, name))
    errors = [m[1].get("exception_message") for m in messages if m[0] == "execution_error"]
    assert ok, (outputs, errors)
    assert outputs["11"]["images"][0]["type"] == "output"
    if name == "sd15_mask_preview":
        assert len(outputs["13"]["images"]) == 2    # one mask per step


def test_sdxl_workflow_validates(env, files):
    prompt = prompt_for(files, "sdxl_single_subject")
    valid = __import__("asyncio").run(env.execution.validate_prompt("x", prompt, None))
    assert valid[0], valid[1]


def sample(env, model, positive, negative, steps=2, seed=0):
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    return env.nodes.common_ksampler(model, seed, steps, 5.0, "euler", "normal", positive, negative, latent)[0]["samples"]


def apply(env, loaded, subject, **overrides):
    args = dict(model=loaded["model"], clip=loaded["clip"], customcontrast=loaded["customcontrast"], subject=subject,
                prompt="a photo of <subject> on the beach", weight=1.0, start_percent=0.0, end_percent=1.0,
                use_mask=True, mask_mode="soft", mask_threshold=0.2)
    args.update(overrides)
    return env.nodes.NODE_CLASS_MAPPINGS["CustomContrastApply"].execute(**args).result


def encode(env, loaded, image, mask=None, **kw):
    cls = env.nodes.NODE_CLASS_MAPPINGS["CustomContrastEncodeSubject"]
    return cls.execute(loaded["customcontrast"], loaded["clip_vision"], image, kw.get("average", True),
                       kw.get("center_crop", True), mask=mask, image_weights=kw.get("image_weights", "")).result[0]


@pytest.fixture(scope="module")
def photo(env, files):
    return env.nodes.LoadImage().load_image("subject.png")[0]


def test_patched_output_differs_masks_change_upstream_untouched(env, loaded, photo):
    subject = encode(env, loaded, photo)
    before = json.dumps(str(loaded["model"].model_options), sort_keys=True)
    patched, positive = apply(env, loaded, subject)
    negative = env.nodes.CLIPTextEncode().encode(loaded["clip"], "")[0]
    out_patched = sample(env, patched, positive, negative, steps=3)
    out_plain = sample(env, loaded["model"], positive, negative, steps=3)   # the same positive, unpatched
    assert (out_patched - out_plain).abs().max() > 1e-3
    assert json.dumps(str(loaded["model"].model_options), sort_keys=True) == before
    assert "patches_replace" not in loaded["model"].model_options.get("transformer_options", {})
    patch = patched.model_options["transformer_options"]["customcontrast"][-1]
    history = patch.last_masks
    assert len(history) == 3 and [s for s, _ in history] == sorted([s for s, _ in history], reverse=True)
    assert (history[0][1][0] - history[1][1][0]).abs().max() > 0
    # a second run starts clean and is deterministic
    again = sample(env, patched, positive, negative, steps=3)
    torch.testing.assert_close(again, out_patched)


def test_weight_zero_without_mask_is_the_s_plus_text_alone(env, loaded, photo):
    """γ = 0 and no mask: the visual branch vanishes and only the S+ text remains, i.e. the patched MODEL without
    its attention replace (ComfyUI's own attention on the swapped contexts); γ = 1 differs from it."""
    subject = encode(env, loaded, photo)
    negative = env.nodes.CLIPTextEncode().encode(loaded["clip"], "")[0]
    zero, positive = apply(env, loaded, subject, weight=0.0, use_mask=False)
    one, positive_one = apply(env, loaded, subject, weight=1.0, use_mask=False)
    text_only = zero.clone()   # model_options deep-copied: the swap stays, the attention replace goes
    del text_only.model_options["transformer_options"]["patches_replace"]["attn2"]
    reference = sample(env, text_only, positive, negative)
    # ComfyUI's CPU attention (split einsum) and the patch's fused attention round differently: |x| ~ 300
    torch.testing.assert_close(sample(env, zero, positive, negative), reference, rtol=1e-4, atol=1e-2)
    assert (sample(env, one, positive_one, negative) - reference).abs().max() > 1.0


def test_a_positive_that_is_not_the_applys_gives_exactly_the_unpatched_samples(env, loaded, photo, caplog):
    """A plain CLIPTextEncode positive, or the Apply's positive concatenated with another prompt, is not the
    Apply node's conditioning: the patched MODEL samples exactly what the unpatched one does (no visual branch on
    cond or uncond rows), records no mask and warns once per run."""
    import logging

    subject = encode(env, loaded, photo)
    negative = env.nodes.CLIPTextEncode().encode(loaded["clip"], "")[0]
    patched, positive = apply(env, loaded, subject)
    plain_positive = env.nodes.CLIPTextEncode().encode(loaded["clip"], "a photo of a dog on the beach")[0]
    concat = env.nodes.NODE_CLASS_MAPPINGS["ConditioningConcat"]().concat(positive, plain_positive)[0]
    patch = patched.model_options["transformer_options"]["customcontrast"][-1]
    with caplog.at_level(logging.WARNING, logger="customcontrast"):
        for other in (plain_positive, concat):
            unpatched = sample(env, loaded["model"], other, negative)
            torch.testing.assert_close(sample(env, patched, other, negative), unpatched, rtol=0, atol=0)
            assert patch.last_masks == []
    assert len([r for r in caplog.records if "its subject was not drawn" in r.getMessage()]) == 2


BAD_INPUTS = [
    (dict(prompt="a photo of a dog"), "has no '<subject>'"),
    (dict(prompt="<subject> and <subject3>"), "unknown placeholder '<subject3>'"),
    (dict(start_percent=0.8, end_percent=0.2), "must not be after"),
]


@pytest.mark.parametrize("overrides,message", BAD_INPUTS)
def test_bad_apply_inputs(env, loaded, photo, overrides, message):
    subject = encode(env, loaded, photo)
    with pytest.raises(ValueError, match=message):
        apply(env, loaded, subject, **overrides)


def test_bad_subject_inputs(env, loaded, photo):
    with pytest.raises(ValueError, match="expected at least 16x16"):
        encode(env, loaded, torch.rand(1, 1, 1, 3))
    with pytest.raises(ValueError, match="mask is empty"):
        encode(env, loaded, photo, mask=torch.zeros(photo.shape[1:3]))
    with pytest.raises(ValueError, match="give a mask of the same size or aspect ratio"):
        encode(env, loaded, photo, mask=torch.ones(10, 30))


def test_image_variants_are_accepted(env, loaded, photo):
    rgba = torch.cat([photo, torch.ones_like(photo[..., :1])], dim=-1)
    rgba[:, :, : photo.shape[2] // 2, 3] = 0
    gray = photo.mean(-1, keepdim=True)
    big = torch.rand(1, 4096, 4096, 3)
    small_mask = torch.zeros(photo.shape[1] // 2, photo.shape[2] // 2)
    small_mask[10:50, 10:50] = 1
    for image, mask in ((rgba, None), (gray, None), (big, None), (photo, small_mask)):
        subject = encode(env, loaded, image, mask=mask)
        assert subject.hidden.shape == (1, 3, 257, 1024) and torch.isfinite(subject.hidden).all()


def test_a_clip_vision_model_other_than_the_trained_one_is_refused_naming_both(env, loaded, photo, caplog):
    """Encode Subject compares the CLIP_VISION given with the checkpoint's record: another width (ViT-H for a
    ViT-L checkpoint) or another input size (ViT-L/14-336 recorded, the 224 px ViT-L given) is refused with both
    described. A checkpoint written before the record loads (with a log line saying so) and encodes. Fails when
    Encode Subject skips the comparison (the 336 px checkpoint would encode with the 224 px model)."""
    import dataclasses
    import logging

    from comfy_env import customcontrast_test_config
    from customcontrast_core import checkpoint
    from customcontrast_core.checkpoint import VisionTower
    from customcontrast_core.visual_kv import CustomContrastModel

    loader = env.nodes.NODE_CLASS_MAPPINGS["CustomContrastLoader"]
    folder = env.models / "customcontrast"
    config = dataclasses.replace(customcontrast_test_config(), clip_width=1280, clip_num_layers=32,
                                 clip_layers=(11, 22, 32))
    checkpoint.save(folder / "vith.safetensors", CustomContrastModel(config),
                    clip_vision=VisionTower(1280, 32, 224, 14, "clip-vit-h-14"))
    vith = loader.execute("vith.safetensors").result[0]
    given = "clip_vision is a CLIP-vision model of width 1024, 24 layers, 224 px, patch 14"
    with pytest.raises(ValueError, match=rf"{given}; this CustomContrast checkpoint was trained with 'clip-vit-h-14' "
                                         r"\(width 1280, 32 layers, 224 px, patch 14\) \(width 1280 vs 1024; layers 32 "
                                         r"vs 24, trained vs given\): load the CLIP-vision model it was trained with"):
        encode(env, dict(loaded, customcontrast=vith), photo)
    model = loaded["customcontrast"].model
    checkpoint.save(folder / "vitl336.safetensors", model,
                    clip_vision=VisionTower(1024, 24, 336, 14, "clip-vit-large-patch14-336"))
    vitl336 = loader.execute("vitl336.safetensors").result[0]
    with pytest.raises(ValueError, match=rf"{given}; this CustomContrast checkpoint was trained with "
                                         r"'clip-vit-large-patch14-336' \(width 1024, 24 layers, 336 px, patch 14\) "
                                         r"\(image size 336 vs 224, trained vs given\)"):
        encode(env, dict(loaded, customcontrast=vitl336), photo)
    # a file written before the record: no clip_vision metadata
    header, data = _split(folder / "vitl336.safetensors")
    del header["__metadata__"]["clip_vision"]
    _write(folder / "old.safetensors", header, data)
    env.folder_paths.filename_list_cache.clear() if hasattr(env.folder_paths, "filename_list_cache") else None
    with caplog.at_level(logging.INFO, logger="customcontrast"):
        old = loader.execute("old.safetensors").result[0]
    assert old.info.clip_vision is None
    assert "old.safetensors does not record which CLIP-vision model it was trained with (written before the " \
           "record); Encode Subject checks the CLIP-vision width (1024) and layer count (24) only" in caplog.text
    assert encode(env, dict(loaded, customcontrast=old), photo).hidden.shape == (1, 3, 257, 1024)


def _split(path):
    raw = Path(path).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write(path, header, data):
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    Path(path).write_bytes(len(text).to_bytes(8, "little") + text + data)


def test_the_loader_refuses_a_tiny_preset_checkpoint_saying_what_it_is(env):
    """A checkpoint of the tiny preset (what the quick CPU training writes) is refused by the Loader, named as the
    toy test model, with the real presets expected. Fails when the Loader does not call ``check_real`` (the toy
    would load and fail later at Encode Subject with a width error)."""
    from customcontrast_core import checkpoint, get_preset
    from customcontrast_core.visual_kv import CustomContrastModel

    checkpoint.save(env.models / "customcontrast" / "tiny_toy.safetensors", CustomContrastModel(get_preset("tiny")))
    with pytest.raises(ValueError, match=r"tiny_toy.safetensors is a checkpoint of the `tiny` preset, the toy "
                                              r"test model: it cannot draw on a real SD1.5 or SDXL model .* Expected a "
                                              r"checkpoint of a real preset \(sd15 or sdxl\)"):
        env.nodes.NODE_CLASS_MAPPINGS["CustomContrastLoader"].execute("tiny_toy.safetensors")


def test_missing_checkpoint_names_the_folders(env):
    with pytest.raises(FileNotFoundError, match="searched"):
        env.nodes.NODE_CLASS_MAPPINGS["CustomContrastLoader"].execute("nope.safetensors")


def test_sd15_checkpoint_refused_on_sdxl_model(env, loaded):
    import sys
    from types import SimpleNamespace

    apply_module = sys.modules[env.nodes.NODE_CLASS_MAPPINGS["CustomContrastApply"].__module__.replace(".apply_node", ".apply")]
    fake = SimpleNamespace(model=SimpleNamespace(model_config=SimpleNamespace(unet_config={"context_dim": 2048})))
    with pytest.raises(ValueError, match="checkpoint is for SD15, the MODEL is SDXL"):
        apply_module.check_model(fake, loaded["customcontrast"])


def test_cfg_one_batch_two_and_two_chained_apply_nodes(env, loaded, photo):
    """cfg 1 (no uncond chunk), a batch of 2 latents, and a second Apply on the already patched model."""
    subject = encode(env, loaded, photo)
    negative = env.nodes.CLIPTextEncode().encode(loaded["clip"], "")[0]
    patched, positive = apply(env, loaded, subject)
    latent = {"samples": torch.zeros(2, 4, 8, 8)}
    out = env.nodes.common_ksampler(patched, 0, 2, 1.0, "euler", "normal", positive, negative, latent)[0]["samples"]
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()
    patch = patched.model_options["transformer_options"]["customcontrast"][-1]
    assert len(patch.last_masks) == 2 and patch.last_masks[0][1][0].shape[0] == 2   # one mask per latent

    chained, positive2 = apply(env, dict(loaded, model=patched), subject, prompt="<subject> in the snow", weight=0.5)
    replaces = chained.model_options["transformer_options"]["patches_replace"]["attn2"]
    assert len(replaces) == 16 and all(len(r.patches) == 2 for r in replaces.values())
    assert len(patched.model_options["transformer_options"]["patches_replace"]["attn2"][("input", 1)].patches) == 1
    # each node acts on its own positive only: the other one leaves those rows to the unpatched attention
    second = apply(env, loaded, subject, prompt="<subject> in the snow", weight=0.5)[0]
    torch.testing.assert_close(sample(env, chained, positive2, negative), sample(env, second, positive2, negative),
                               rtol=0, atol=0)
    torch.testing.assert_close(sample(env, chained, positive, negative), sample(env, patched, positive, negative),
                               rtol=0, atol=0)
    # both positives in one batch (ConditioningCombine): the first patch still acts, on its rows
    combined = env.nodes.ConditioningCombine().combine(positive, positive2)[0]
    both = sample(env, chained, combined, negative)
    assert torch.isfinite(both).all() and (both - sample(env, second, combined, negative)).abs().max() > 1e-4


class FakeIPAdapterReplace:
    """The duck type of ComfyUI_IPAdapter_plus' Attn2Replace: callback and kwargs lists, add()."""

    def __init__(self, callback, **kwargs):
        self.callback, self.kwargs = [callback], [kwargs]

    def add(self, callback, **kwargs):
        self.callback.append(callback)
        self.kwargs.append(kwargs)


def test_ipadapter_callbacks_are_adopted_and_can_chain_after(env, loaded, photo):
    import sys

    patch_module = sys.modules[env.nodes.NODE_CLASS_MAPPINGS["CustomContrastApply"].__module__.replace(".apply_node",
                                                                                                     ".comfy_glue")]
    offset = lambda out, q, k, v, extra_options, **kw: torch.full_like(out, kw["weight"])  # noqa: E731
    before = loaded["model"].clone()
    before.set_model_attn2_replace(FakeIPAdapterReplace(offset, weight=0.25, sigma_start=1e9, sigma_end=0.0),
                                   "input", 1, 0)
    patched, _ = apply(env, dict(loaded, model=before), encode(env, loaded, photo))
    replace = patched.model_options["transformer_options"]["patches_replace"]["attn2"][("input", 1, 0)]
    assert isinstance(replace, patch_module.Attn2Replace) and len(replace.callback) == 1
    # IPAdapter applied after CustomContrast calls add() on our object: its output is added in its sigma window
    replace.add(offset, weight=0.5, sigma_start=3.0, sigma_end=1.0)
    q, k, v = torch.randn(1, 16, 320), torch.randn(1, 77, 320), torch.randn(1, 77, 320)
    options = {"n_heads": 8, "sigmas": torch.tensor([2.0]), "block": ("input", 1), "block_index": 0,
               "cond_or_uncond": [1], "activations_shape": [1, 320, 4, 4]}
    plain = patch_module.Attn2Replace()(q, k, v, options)
    torch.testing.assert_close(replace(q, k, v, options) - plain, torch.full_like(plain, 0.75))
    options["sigmas"] = torch.tensor([5.0])    # outside the second callback's window
    torch.testing.assert_close(replace(q, k, v, options) - plain, torch.full_like(plain, 0.25))


def test_splus_buckets_encode_once_per_bucket(env, loaded, photo):
    subject = encode(env, loaded, photo)
    negative = env.nodes.CLIPTextEncode().encode(loaded["clip"], "")[0]
    exact, positive = apply(env, loaded, subject)
    fast, positive_fast = apply(env, loaded, subject, splus_buckets=1)
    a = sample(env, exact, positive, negative, steps=3)
    b = sample(env, fast, positive_fast, negative, steps=3)
    exact_patch = exact.model_options["transformer_options"]["customcontrast"][-1]
    fast_patch = fast.model_options["transformer_options"]["customcontrast"][-1]
    # exact: the 3 timesteps of the schedule in one batched text-encoder call; buckets: 1 timestep, 1 call
    assert exact_patch.encode_calls == 1 and len(exact_patch.cache) == 3
    assert fast_patch.encode_calls == 1 and len(fast_patch.cache) == 1
    assert torch.isfinite(b).all() and (a - b).abs().max() > 0              # approximate, documented


def test_schedule_batched_encoding_equals_one_timestep_per_call(env, loaded, photo, monkeypatch):
    """The paper-exact mode encodes the run's timesteps in batches: same samples as one call per timestep."""
    import sys
    encodings = sys.modules[next(n for n in sys.modules if n.endswith("comfyui-customcontrast.nodes.encodings"))]
    subject = encode(env, loaded, photo)
    negative = env.nodes.CLIPTextEncode().encode(loaded["clip"], "")[0]
    # masks off: the soft mask's threshold would turn round-off of the batched CLIP into a flipped mask pixel
    batched, positive = apply(env, loaded, subject, use_mask=False)
    a = sample(env, batched, positive, negative, steps=4)
    monkeypatch.setattr(encodings, "PROMPTS_PER_CALL", 1)
    single, positive_single = apply(env, loaded, subject, use_mask=False)
    b = sample(env, single, positive_single, negative, steps=4)
    calls = [m.model_options["transformer_options"]["customcontrast"][-1].encode_calls for m in (batched, single)]
    assert calls == [1, 4]
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_the_next_run_reuses_the_splus_encodings_and_equals_a_fresh_apply(env, loaded, photo):
    """A new seed on the same patched MODEL encodes nothing; its samples and masks are those of a fresh node."""
    subject = encode(env, loaded, photo)
    negative = env.nodes.CLIPTextEncode().encode(loaded["clip"], "")[0]
    warm, positive = apply(env, loaded, subject)
    cold, positive_cold = apply(env, loaded, subject)
    warm_patch = warm.model_options["transformer_options"]["customcontrast"][-1]
    cold_patch = cold.model_options["transformer_options"]["customcontrast"][-1]
    sample(env, warm, positive, negative, steps=3, seed=0)
    assert warm_patch.encode_calls == 1 and len(warm_patch.cache) == 3
    a = sample(env, warm, positive, negative, steps=3, seed=1)
    assert warm_patch.encode_calls == 0
    b = sample(env, cold, positive_cold, negative, steps=3, seed=1)
    assert cold_patch.encode_calls == 1
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    for (sigma_a, masks_a), (sigma_b, masks_b) in zip(warm_patch.last_masks, cold_patch.last_masks, strict=True):
        assert sigma_a == sigma_b
        for x, y in zip(masks_a, masks_b, strict=True):
            torch.testing.assert_close(x, y, rtol=0, atol=0)
    sample(env, warm, positive, negative, steps=4, seed=1)       # another schedule: encoded, kept beside the first
    assert warm_patch.encode_calls == 1
    sample(env, warm, positive, negative, steps=3, seed=2)       # two samplers alternating: both stay cached
    assert warm_patch.encode_calls == 0


def test_the_first_run_shows_a_progress_bar_over_the_timesteps_it_encodes(env, loaded, photo, monkeypatch):
    """ComfyUI's progress hook sees the S+ encoding of the first run after Apply: one update per batched call
    (2 timesteps each here), counting the run's 5 timesteps up to its total; the warm run that follows shows none.
    Fails when the bar is never updated, or is updated on warm runs (a bar made and filled without encoding)."""
    import sys

    import comfy.utils
    encodings = sys.modules[next(n for n in sys.modules if n.endswith("comfyui-customcontrast.nodes.encodings"))]
    monkeypatch.setattr(encodings, "PROMPTS_PER_CALL", 2 * 16)    # 2 timesteps of 16 layer groups per call
    seen = []

    def hook(value, total, preview, node_id=None):
        frame = sys._getframe(1)
        while frame and not (frame.f_code.co_name == "encodings" and frame.f_code.co_filename.endswith("patch.py")):
            frame = frame.f_back
        seen.append((value, total, frame is not None))   # frame: the update comes from the S+ encoding

    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", comfy.utils.PROGRESS_BAR_HOOK)   # restored afterwards
    comfy.utils.set_progress_bar_global_hook(hook)
    subject = encode(env, loaded, photo)
    negative = env.nodes.CLIPTextEncode().encode(loaded["clip"], "")[0]
    patched, positive = apply(env, loaded, subject)
    sample(env, patched, positive, negative, steps=5)
    assert patched.model_options["transformer_options"]["customcontrast"][-1].encode_calls == 3
    assert [(v, t) for v, t, ours in seen if ours] == [(2, 5), (4, 5), (5, 5)]
    assert [v for v, t, ours in seen if not ours] == [1, 2, 3, 4, 5]          # the sampler's own bar, after
    seen.clear()
    sample(env, patched, positive, negative, steps=5, seed=1)
    assert [s for s in seen if s[2]] == [] and len(seen) == 5


def test_an_fp16_checkpoint_is_cast_to_the_dtype_the_model_runs_in(env, loaded, photo):
    """An fp16 export loads as fp16 (half the memory of fp32) and Apply casts it to the MODEL's compute dtype: an
    fp32 MODEL samples exactly what the fp32 file of the same (fp16-rounded) weights samples; a MODEL computing in
    bf16 (``manual_cast_dtype``) gets the weights in bf16, one copy shared by its Apply nodes, and samples.
    Fails when Apply passes the checkpoint on in the file's dtype (the patch's weights stay fp16)."""
    from customcontrast_core import checkpoint
    from customcontrast_core.visual_kv import CustomContrastModel

    folder = env.models / "customcontrast"
    weights = loaded["customcontrast"].model
    rounded = CustomContrastModel(weights.config)
    rounded.load_state_dict({k: v.half().float() for k, v in weights.state_dict().items()})
    checkpoint.save(folder / "cc_fp16.safetensors", weights, dtype=torch.float16)
    checkpoint.save(folder / "cc_rounded.safetensors", rounded)
    loader = env.nodes.NODE_CLASS_MAPPINGS["CustomContrastLoader"]
    half, full = (loader.execute(name).result[0] for name in ("cc_fp16.safetensors", "cc_rounded.safetensors"))
    assert half.info.dtype == "fp16" and {p.dtype for p in half.model.parameters()} == {torch.float16}
    subject = encode(env, loaded, photo)
    negative = env.nodes.CLIPTextEncode().encode(loaded["clip"], "")[0]

    def patch_of(patched):
        return patched.model_options["transformer_options"]["customcontrast"][-1]

    from_half, positive_half = apply(env, dict(loaded, customcontrast=half), subject)
    from_full, positive_full = apply(env, dict(loaded, customcontrast=full), subject)
    assert {p.dtype for p in patch_of(from_half).model.parameters()} == {torch.float32}
    torch.testing.assert_close(positive_half[0][0], positive_full[0][0], rtol=0, atol=0)
    torch.testing.assert_close(sample(env, from_half, positive_half, negative),
                               sample(env, from_full, positive_full, negative), rtol=0, atol=0)

    bf16 = loaded["model"].clone()
    bf16.set_model_compute_dtype(torch.bfloat16)
    first, positive = apply(env, dict(loaded, model=bf16, customcontrast=half), subject)
    second, _ = apply(env, dict(loaded, model=bf16, customcontrast=half), subject, weight=0.5)
    cast = patch_of(first).model
    assert cast is patch_of(second).model and {p.dtype for p in cast.parameters()} == {torch.bfloat16}
    for key, value in half.model.state_dict().items():
        assert torch.equal(cast.state_dict()[key], value.to(torch.bfloat16)), key
    out = sample(env, first, positive, negative)
    assert torch.isfinite(out).all() and (out - sample(env, bf16, positive, negative)).abs().max() > 1e-3
