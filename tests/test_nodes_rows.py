"""Which rows of a batch one Apply node patches (real ComfyUI UNet, tiny random weights): its prompt's cond rows
and the uncond rows; every other cond row is exactly the unpatched UNet's; the user mask per latent."""
import dataclasses
import logging

import pytest
import torch

from customcontrast_core import CustomContrastModel, get_preset
import test_comfyui_patch as shared
from test_comfyui_patch import comfy_forward, comfy_twin, make_patch
from training.tiny_models import tiny_unet

env = shared.env   # the same fixture

SIGMAS = (9.0, 7.0, 5.0)   # masks made at the first step act at the next ones


@pytest.fixture(scope="module")
def tiny(env):
    config = get_preset("tiny")
    torch.manual_seed(0)
    unet = comfy_twin(tiny_unet(config), config)
    model = CustomContrastModel(config).eval()
    torch.manual_seed(1)
    ours, foreign, negative = (torch.randn(1, 77, config.context_dim) for _ in range(3))
    return config, unet, model, ours, foreign, negative


def run(tiny, contexts, chunks, *, user_mask=None, latents=1, patch=None):
    """One step per sigma of SIGMAS through the patched UNet (the same latents in every chunk); returns the
    outputs per step (B, 4, 16, 16) and the patch."""
    config, unet, model, ours, _, _ = tiny
    if patch is None:
        patch, encodings = make_patch(model, config, ours, SIGMAS[0], use_mask=True, more_sigmas=SIGMAS[1:])
        torch.manual_seed(4)
        blank = [torch.randn_like(encodings.visual[0])]                     # the uncond rows' branch acts too
        for sigma in SIGMAS:
            patch.cache[sigma] = dataclasses.replace(encodings, blank_visual=blank)
        patch.settings = dataclasses.replace(patch.settings, user_mask=user_mask)
    context = torch.cat([c.expand(latents, -1, -1) for c in contexts])
    outputs = []
    torch.manual_seed(5)
    for sigma in SIGMAS:
        x = torch.randn(latents, 4, 16, 16).repeat(len(chunks), 1, 1, 1)
        t = torch.tensor([sigma * 100] * x.shape[0])
        outputs.append(comfy_forward(unet, patch, x, t, context, sigma, chunks=chunks)[0])
    return outputs, patch


def plain(tiny, contexts, latents=1):
    """The unpatched UNet on the same batches as ``run``."""
    unet = tiny[1]
    context = torch.cat([c.expand(latents, -1, -1) for c in contexts])
    outputs = []
    torch.manual_seed(5)
    for sigma in SIGMAS:
        x = torch.randn(latents, 4, 16, 16).repeat(len(contexts), 1, 1, 1)
        with torch.no_grad():
            outputs.append(unet(x, timesteps=torch.tensor([sigma * 100] * x.shape[0]), context=context))
    return outputs


def test_another_prompts_rows_are_the_unpatched_unets_and_ours_do_not_change(tiny):
    """A batch of this node's prompt, another prompt (ConditioningCombine, another Apply node) and the negative:
    the other prompt's row is the plain UNet's to the last bit; this node's and the negative's rows are those of
    a batch without the other prompt, masks included."""
    _, _, _, ours, foreign, negative = tiny
    mixed, patch = run(tiny, [negative, ours, foreign], (1, 0, 0))
    alone, patch_alone = run(tiny, [negative, ours], (1, 0))
    reference = plain(tiny, [negative, ours, foreign])
    for got, want, unpatched in zip(mixed, alone, reference):
        torch.testing.assert_close(got[2], unpatched[2], rtol=0, atol=0)
        torch.testing.assert_close(got[:2], want, rtol=1e-5, atol=1e-5)
        assert (got[1] - unpatched[1]).abs().max() > 1e-3 and (got[0] - unpatched[0]).abs().max() > 1e-3
    patch.end_run()
    patch_alone.end_run()
    assert [s for s, _ in patch.last_masks] == list(SIGMAS)
    for (_, masks), (_, masks_alone) in zip(patch.last_masks, patch_alone.last_masks):
        torch.testing.assert_close(masks[0], masks_alone[0], rtol=1e-5, atol=1e-5)


def test_a_run_without_the_nodes_prompt_is_the_unpatched_unet_and_warns_once(tiny, caplog):
    """Cond rows of another prompt only: cond and uncond rows are the plain UNet's, no mask is made, one warning
    at the end of the run; a batch of uncond rows alone (ComfyUI split the evaluation) stays unpatched after it."""
    _, _, _, _, foreign, negative = tiny
    with caplog.at_level(logging.WARNING, logger="customcontrast"):
        outputs, patch = run(tiny, [negative, foreign], (1, 0))
        for got, want in zip(outputs, plain(tiny, [negative, foreign])):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        split, _ = run(tiny, [negative], (1,), patch=patch)
        for got, want in zip(split, plain(tiny, [negative])):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        patch.end_run()
    assert patch.last_masks == []
    warnings = [r for r in caplog.records if "its subject was not drawn" in r.getMessage()]
    assert len(warnings) == 1
    patch.start_run([])   # a new run: an uncond batch before any cond batch gets the blank reference's visual branch
    first, _ = run(tiny, [negative], (1,), patch=patch)
    assert (first[0] - plain(tiny, [negative])[0]).abs().max() > 1e-3


def test_user_masks_apply_per_latent(tiny):
    """attn_mask with one mask per latent (batch 2): each latent gets its own; 1 mask acts on every latent."""
    _, _, _, ours, _, negative = tiny
    half = torch.ones(2, 32, 32)
    half[1, :, :16] = 0
    per_latent, _ = run(tiny, [negative, ours], (1, 0), user_mask=half, latents=2)
    shared, _ = run(tiny, [negative, ours], (1, 0), user_mask=torch.ones(1, 32, 32), latents=2)
    for got, want in zip(per_latent, shared):   # rows: uncond latent 0, 1, cond latent 0, 1
        torch.testing.assert_close(got[[0, 2]], want[[0, 2]], rtol=1e-5, atol=1e-5)
        assert (got[[1, 3]] - want[[1, 3]]).abs().max() > 1e-3
    with pytest.raises(ValueError, match=r"attn_mask holds 3 masks and the latent batch is 2: give 1 mask"):
        run(tiny, [negative, ours], (1, 0), user_mask=torch.ones(3, 32, 32), latents=2)
