"""The nodes' inputs inside a real ComfyUI (COMFYUI_PATH): slider ends, mask conventions and counts, subject
sockets, the Mask Preview's subject; each refusal names the input to fix."""
import sys

import numpy as np
import pytest
import torch

import test_comfyui_nodes as shared
from test_comfyui_nodes import apply, encode, sample

env, files, loaded, photo = shared.env, shared.files, shared.loaded, shared.photo   # the same fixtures


def _module(name):
    return sys.modules[next(m for m in sys.modules if m.endswith(f"comfyui-customcontrast.nodes.{name}"))]


def patch_of(model):
    return model.model_options["transformer_options"]["customcontrast"][-1]


def test_mask_threshold_takes_both_ends_of_its_slider_in_the_mode_that_allows_them(env, loaded, photo):
    subject = encode(env, loaded, photo)
    soft = patch_of(apply(env, loaded, subject, mask_mode="soft", mask_threshold=0.0)[0]).settings.mask
    assert (soft.mode, soft.threshold, soft.topk_ratio) == ("soft", 0.0, 0.25)
    topk_model, positive = apply(env, loaded, subject, mask_mode="topk", mask_threshold=1.0)
    topk = patch_of(topk_model).settings.mask
    assert (topk.mode, topk.threshold, topk.topk_ratio) == ("topk", 0.2, 1.0)
    negative = env.nodes.CLIPTextEncode().encode(loaded["clip"], "")[0]
    sample(env, topk_model, positive, negative, steps=2)
    assert [float(m[0].min()) for _, m in patch_of(topk_model).last_masks] == [1.0, 1.0]   # the whole image kept
    with pytest.raises(ValueError, match=r"mask_threshold must be at least 0 and below 1 with mask_mode 'soft' "
                                         r".*got 1.0"):
        apply(env, loaded, subject, mask_mode="soft", mask_threshold=1.0)
    with pytest.raises(ValueError, match=r"mask_threshold must be above 0 and at most 1 with mask_mode 'topk' "
                                         r".*got 0.0"):
        apply(env, loaded, subject, mask_mode="topk", mask_threshold=0.0)


@pytest.fixture
def references(monkeypatch):
    """The images the Encode Subject node hands to CLIP vision (the reference, then the blank one)."""
    subject_module = _module("subject")
    seen, original = [], subject_module.clip_hidden
    monkeypatch.setattr(subject_module, "clip_hidden", lambda cv, image, *args: seen.append(image) or
                        original(cv, image, *args))
    return seen


def encode_node(env, loaded, image, mask=None, invert_mask=False):
    cls = env.nodes.NODE_CLASS_MAPPINGS["CustomContrastEncodeSubject"]
    inverted = dict(invert_mask=True) if invert_mask else {}
    return cls.execute(loaded["customcontrast"], loaded["clip_vision"], image, True, True, mask=mask,
                       **inverted).result[0]


def test_invert_mask_takes_load_images_mask_of_a_cutout(env, loaded, references):
    """Load Image's MASK is 1 - alpha: inverted it keeps the opaque subject (220/255 gray in the middle) and greys
    the background, exactly as the image's alpha channel does; not inverted the subject is greyed out."""
    from PIL import Image

    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., :3] = 30
    rgba[16:48, 16:48, :3], rgba[16:48, 16:48, 3] = 220, 255
    Image.fromarray(rgba, "RGBA").save(env.input_dir / "cutout.png")
    image, mask = env.nodes.LoadImage().load_image("cutout.png")
    assert mask[0, 32, 32].item() == 0.0 and mask[0, 2, 2].item() == 1.0
    encode_node(env, loaded, image, mask, invert_mask=True)
    encode_node(env, loaded, torch.cat([image, torch.from_numpy(rgba[None, ..., 3:] / 255.0).float()], -1))
    encode_node(env, loaded, image, mask)
    rgba_image = torch.cat([image, torch.from_numpy(rgba[None, ..., 3:] / 255.0).float()], -1)
    encode_node(env, loaded, rgba_image, invert_mask=True)   # no MASK: the alpha is never inverted
    inverted, alpha, plain, rgba_inverted = references[0], references[2], references[4], references[6]
    torch.testing.assert_close(inverted[0, 32, 32], torch.full((3,), 220 / 255), rtol=0, atol=1e-6)
    torch.testing.assert_close(inverted[0, 0, 0], torch.full((3,), 0.5), rtol=0, atol=1e-6)   # background: gray
    torch.testing.assert_close(inverted, alpha, rtol=0, atol=0)
    torch.testing.assert_close(rgba_inverted, alpha, rtol=0, atol=0)
    torch.testing.assert_close(plain[0, 32, 32], torch.full((3,), 0.5), rtol=0, atol=1e-6)


def test_each_image_needs_its_mask_and_the_mask_count_is_one_or_the_image_count(env, loaded, references):
    images = torch.rand(2, 64, 64, 3)
    masks = torch.zeros(2, 64, 64)
    masks[0, 10:40, 10:40] = 1
    with pytest.raises(ValueError, match=r"mask 1 \(for image 1\) is empty \(all zero\) at the image's size 64x64"):
        encode_node(env, loaded, images, masks)
    with pytest.raises(ValueError, match=r"the mask input holds 5 masks for 1 image\(s\): give 1 mask \(used for "
                                         r"every image\) or one per image"):
        encode_node(env, loaded, images[:1], torch.ones(5, 64, 64))
    masks[1, 20:60, 30:50] = 1
    encode_node(env, loaded, images, masks)   # each image cut out with its own mask
    segment = _module("subject").segment
    torch.testing.assert_close(references[0], segment(images, masks), rtol=0, atol=0)
    assert (references[0][1] - segment(images[1:], masks[:1])[0]).abs().max() > 0.1


def test_subject3_without_subject2_is_refused(env, loaded, photo):
    subject = encode(env, loaded, photo)
    with pytest.raises(ValueError, match=r"subject3 is connected but subject2 is not: placeholders are numbered by "
                                         r"input \(<subject1>, <subject2>, <subject3>\)"):
        apply(env, loaded, subject, subject3=subject, prompt="<subject1> and <subject3>")


def test_mask_preview_refuses_a_subject_the_patch_does_not_have(env, loaded, photo):
    patched, positive = apply(env, loaded, encode(env, loaded, photo))
    sample(env, patched, positive, env.nodes.CLIPTextEncode().encode(loaded["clip"], "")[0])
    preview = env.nodes.NODE_CLASS_MAPPINGS["CustomContrastMaskPreview"]
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    assert preview.execute(patched, latent, 1).result[1].shape == (2, 64, 64)
    with pytest.raises(ValueError, match=r"subject is 3 but the MODEL's Apply CustomContrast node has 1 subject\(s\): "
                                         r"choose 1$"):
        preview.execute(patched, latent, 3)


def test_attn_mask_holds_one_mask_or_one_per_latent(env, loaded, photo):
    subject = encode(env, loaded, photo)
    negative = env.nodes.CLIPTextEncode().encode(loaded["clip"], "")[0]
    patched, positive = apply(env, loaded, subject, attn_mask=torch.ones(2, 64, 64))

    def run(batch):
        latent = {"samples": torch.zeros(batch, 4, 8, 8)}
        out = env.nodes.common_ksampler(patched, 0, 2, 5.0, "euler", "normal", positive, negative, latent)
        return out[0]["samples"]
    assert run(2).shape == (2, 4, 8, 8)
    assert patch_of(patched).last_masks[-1][1][0].shape[0] == 2
    with pytest.raises(ValueError, match=r"attn_mask holds 2 masks and the latent batch is 3: give 1 mask \(used for "
                                         r"every latent\) or one per latent"):
        run(3)
    with pytest.raises(ValueError, match=r"attn_mask 1 \(of 2\) is empty \(all zero\)"):
        apply(env, loaded, subject, attn_mask=torch.stack([torch.ones(64, 64), torch.zeros(64, 64)]))
