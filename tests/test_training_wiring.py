"""The training step hands each loss the tensors the paper names (Sec. 3.3-3.4, Eq. 4, 7, 8, 9).

One step of the tiny SD1.5-structured preset is run with every loss function wrapped to record its inputs;
each input is then rebuilt here from the batch through the frozen models and the encoder on their own:
- CSCL (Eq. 4): the visual and textual CLS of the same sample, row for row (the reference view's encoding);
- MACL (Eq. 7): the anchor's S+ from the reference view, its positive's from the positive view (another frame of
  the same subject) at the same timestep, and the appearance features ψ_C of those two views;
- L_loc (Eq. 8): the subject mask of the target view (the frame the diffusion loss reconstructs) and Ā, the map
  the inference masks are made from (text and visual maps, each normalised over space);
- L_LDM: the target view is what the VAE encodes.
"""
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from torch.utils.data import default_collate

import training.step as step
from customcontrast_core.masks import combine_maps
from customcontrast_core.propagation import subject_location
from training.config import TrainConfig
from training.data import DataConfig, SubjectDataset, generate_synthetic, read_manifest
from training.losses import localization_loss
from training.loop import build_module
from training.models import appearance_features, clip_hidden_states

ATOL = dict(rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def batch(tmp_path_factory) -> dict:
    folder: Path = tmp_path_factory.mktemp("wiring")
    manifest = generate_synthetic(folder / "data", num_subjects=4, views=3, size=64, seed=0)
    dataset = SubjectDataset(read_manifest(manifest), DataConfig(reference_size=32, target_size=64, augment=False))
    return default_collate([dataset[i] for i in range(3)])


def run_step(batch: dict, monkeypatch, **fields) -> tuple[step.TrainingModule, dict]:
    """One forward of the training step with every loss's inputs recorded (and the UNet's timesteps and the
    VAE encoder's input)."""
    cfg = TrainConfig(**{**dict(augment=False, drop_image=0.0, drop_text=0.0, drop_both=0.0, batch_size=3), **fields})
    module = build_module(cfg)
    seen: dict = {}

    def recording(name, loss):
        def wrapped(*args, **kwargs):
            seen[name] = [a.detach().clone() for a in args]
            return loss(*args, **kwargs)
        return wrapped

    for name in ("cscl_loss", "macl_loss", "localization_loss"):
        monkeypatch.setattr(step, name, recording(name, getattr(step, name)))
    def keep(name, index):
        def hook(module, args):
            seen.setdefault(name, args[index].clone())   # returns None: the inputs stay as they are
        return hook

    module.frozen.unet.register_forward_pre_hook(keep("timesteps", 1))
    module.frozen.vae.encoder.register_forward_pre_hook(keep("vae_input", 0))
    loss, terms = module(batch, torch.Generator().manual_seed(0))
    seen["terms"] = terms
    assert torch.isfinite(loss)
    return module, seen


def own_encodings(module: step.TrainingModule, batch: dict, timesteps: torch.Tensor):
    """The reference and positive views encoded on their own at ``timesteps``, and their ψ_C features."""
    frozen, layers = module.frozen, module.model.config.clip_layers
    with torch.no_grad():
        ref = module.model.encoder(clip_hidden_states(frozen.clip_vision, batch["reference"], layers), timesteps.float())
        pos = module.model.encoder(clip_hidden_states(frozen.clip_vision, batch["positive"], layers), timesteps.float())
        app = [appearance_features(frozen.appearance, batch[k]).float() for k in ("reference", "positive")]
    return ref, pos, app


@pytest.fixture(scope="module")
def default_step(batch):
    with pytest.MonkeyPatch.context() as monkeypatch:
        module, seen = run_step(batch, monkeypatch)
        yield module, seen, own_encodings(module, batch, seen["timesteps"])


def test_macl_positive_is_the_positive_view_at_the_anchors_timestep(batch, default_step):
    module, seen, (ref, pos, (app_ref, app_pos)) = default_step
    anchor, positive, appearance_anchor, appearance_positive = seen["macl_loss"]
    torch.testing.assert_close(anchor, ref.splus, **ATOL)
    torch.testing.assert_close(positive, pos.splus, **ATOL)
    torch.testing.assert_close(appearance_anchor, app_ref, **ATOL)
    torch.testing.assert_close(appearance_positive, app_pos, **ATOL)
    # the check has teeth: the positive view differs from the reference, and S+ depends on the timestep
    assert (pos.splus - ref.splus).abs().max() > 1e-3
    with torch.no_grad():
        hidden = clip_hidden_states(module.frozen.clip_vision, batch["positive"], module.model.config.clip_layers)
        other_time = module.model.encoder(hidden, seen["timesteps"].flip(0).float() + 1)
    assert (other_time.splus - pos.splus).abs().max() > 1e-3


def test_cscl_pairs_the_cls_tokens_of_the_same_sample(default_step):
    _, seen, (ref, pos, _) = default_step
    visual_cls, text_cls = seen["cscl_loss"]
    torch.testing.assert_close(visual_cls, ref.visual_cls_embed, **ATOL)
    torch.testing.assert_close(text_cls, ref.text_cls_embed, **ATOL)
    assert (text_cls.roll(1, 0) - text_cls).abs().max() > 1e-3   # a shifted pairing would be seen


def test_localization_reads_the_target_views_mask_on_the_combined_map(batch, default_step):
    module, seen, _ = default_step
    attn_map, mask = seen["localization_loss"]
    state = module.state
    names = list(state.maps)
    grids = [state.grids[n] for n in names]
    grid = max(grids, key=lambda g: g[0] * g[1])
    assert all(state.maps[n].visual is not None for n in names)
    text = combine_maps([state.maps[n].text for n in names], grids, grid)
    visual = combine_maps([state.maps[n].visual for n in names], grids, grid)
    expected_map = subject_location(text, visual)                         # what the inference masks are made of
    torch.testing.assert_close(attn_map, rearrange(expected_map, "b h w -> b (h w)"), **ATOL)
    assert (attn_map - rearrange(text, "b h w -> b (h w)")).abs().max() > 1e-2   # not the text map alone

    def at_grid(masks):
        return rearrange(F.interpolate(masks.float(), size=grid, mode="area") > 0.5, "b 1 h w -> b (h w)").float()
    torch.testing.assert_close(mask, at_grid(batch["target_mask"]))
    assert not torch.equal(at_grid(batch["reference_mask"]), at_grid(batch["target_mask"]))   # the check has teeth
    # the loss the step reports is L_loc of exactly these
    torch.testing.assert_close(seen["terms"]["loc"], localization_loss(attn_map, mask), **ATOL)


def test_the_default_localization_map_is_combined_and_text_only_is_an_option(batch, monkeypatch):
    assert TrainConfig().loc_maps == "combined"
    module, seen = run_step(batch, monkeypatch, loc_maps="text")
    attn_map, _ = seen["localization_loss"]
    state = module.state
    names = list(state.maps)
    grids = [state.grids[n] for n in names]
    grid = max(grids, key=lambda g: g[0] * g[1])
    assert all(state.maps[n].visual is None for n in names)              # the visual maps are not even computed
    text = combine_maps([state.maps[n].text for n in names], grids, grid)
    torch.testing.assert_close(attn_map, rearrange(text, "b h w -> b (h w)"), **ATOL)
    with pytest.raises(ValueError, match="TrainConfig.loc_maps: expected 'combined' or 'text', found 'visual'"):
        TrainConfig(loc_maps="visual")


def test_combined_localization_leaves_out_rows_without_their_reference(batch, monkeypatch):
    """An image-dropped row's visual tokens come from a blank reference: no subject for its visual map to find."""
    for loc_maps, rows in (("combined", None), ("text", 3)):
        _, seen = run_step(batch, monkeypatch, loc_maps=loc_maps, drop_image=1.0)
        if rows is None:
            assert "localization_loss" not in seen and seen["terms"]["loc"] == 0
        else:
            assert seen["localization_loss"][0].shape[0] == rows


def test_diffusion_loss_reconstructs_the_target_view(batch, default_step):
    _, seen, _ = default_step
    torch.testing.assert_close(seen["vae_input"], batch["target"].to(seen["vae_input"].dtype))


def test_sdxl_added_condition_is_the_prompts_pooled_vector_without_splus(batch):
    """SDXL's pooled text embedding in training: the prompt with the placeholder's first BPE token in its slot
    (``pooled_prompt_ids``, the ComfyUI node's rule; no S+), and the target's size ids. The tiny SDXL-structured
    UNet has no added conditions, so the step's helper is called as an SDXL UNet makes the step call it."""
    module = build_module(TrainConfig(encoder_preset="tiny_sdxl", augment=False, batch_size=3))
    text = module.frozen.text
    tokenizer, first = text.tokenizers[1], text.tokenizers[1].word_ids(step.PLACEHOLDER)[:1]
    rows = []
    for caption in batch["caption"]:
        before, _, after = caption.partition(step.PLACEHOLDER)
        ids = [tokenizer.sot, *tokenizer.word_ids(before), *first, *tokenizer.word_ids(after), tokenizer.eot]
        rows.append(ids + [tokenizer.pad_id] * (77 - len(ids)))
    with torch.no_grad():
        expected = text.encoders[1](input_ids=torch.tensor(rows)).text_embeds
    module.frozen.unet = SimpleNamespace(config=SimpleNamespace(addition_embed_type="text_time"))
    condition = module._added_conditions(text.tokenize(batch["caption"], step.PLACEHOLDER), 3, torch.device("cpu"))
    torch.testing.assert_close(condition["text_embeds"], expected, rtol=1e-5, atol=1e-6)
    assert condition["time_ids"].tolist() == [[64, 64, 0, 0, 64, 64]] * 3
