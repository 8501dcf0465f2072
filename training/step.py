"""One training step of Eq. 9: L_LDM + λ1 (L_CSCL + L_MACL) + λ2 L_loc (Sec. 3.3-3.4).

``TrainingModule`` is the one ``nn.Module`` whose forward runs a whole step, so DDP (through
accelerate or torchrun) wraps it and syncs exactly the trainable weights: the MFI-Encoder and
the visual K/V. The frozen models are held outside its module tree.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from customcontrast_core.encoder import SubjectEncoding
from customcontrast_core.visual_kv import CustomContrastModel

from .config import TrainConfig
from .losses import (cscl_loss, gather_with_grad, localization_loss, location_map, macl_loss, sample_condition_dropout,
                     total_loss)
from .models import FrozenModels, appearance_features, clip_hidden_states, vae_latent_moments
from .processors import ProcessorState, install_processors, project_visual_kv

PLACEHOLDER = "<subject>"
CSCL_HEADS = ("visual_cls_proj", "text_cls_proj")   # encoder modules that only L_CSCL trains


def _split(encoding: SubjectEncoding, sizes: list[int]) -> list[SubjectEncoding]:
    """Splits an encoding's rows into consecutive parts of ``sizes`` rows (views)."""
    fields = {f.name: getattr(encoding, f.name).split(sizes) for f in dataclasses.fields(encoding)}
    return [SubjectEncoding(**{k: v[i] for k, v in fields.items()}) for i in range(len(sizes))]


class TrainingModule(nn.Module):
    """Trainable CustomContrast weights plus the step that trains them."""

    def __init__(self, model: CustomContrastModel, frozen: FrozenModels, cfg: TrainConfig) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.__dict__["frozen"] = frozen          # not a submodule: never trained, never synced
        self.state = ProcessorState()
        self._blank_hidden: dict[tuple, Tensor] = {}   # (device, dtype, size) -> CLIP features of a blank image
        install_processors(frozen.unet, model, self.state, cfg.capture_downsample)
        if "cscl" not in cfg.contrastive_terms:
            # only L_CSCL reaches the CLS projection heads: left out of the loss, they are frozen for the run, so
            # DDP (which expects a gradient for every trainable weight) does not stall waiting for theirs
            for head in CSCL_HEADS:
                getattr(model.encoder, head).requires_grad_(False)

    def forward(self, batch: Mapping[str, Tensor | list], generator: torch.Generator, *, rank: int = 0,
                world: int = 1) -> tuple[Tensor, dict[str, Tensor]]:
        """Runs one step on this process's rows of a global batch of distinct subjects.

        Random draws (dropout, timesteps, noise) are made for the whole global batch from a generator
        that is identical on every process, and each process takes its rows: N processes with batch b
        see exactly what one process with batch N*b sees.
        """
        cfg, frozen, encoder = self.cfg, self.frozen, self.model.encoder
        layers = self.model.config.clip_layers
        device = next(self.model.parameters()).device
        reference, positive = batch["reference"].to(device), batch["positive"].to(device)
        b = reference.shape[0]
        mine = slice(rank * b, (rank + 1) * b)
        drop_image, drop_text = (d[mine] for d in sample_condition_dropout(
            b * world, generator=generator, p_image=cfg.drop_image, p_text=cfg.drop_text, p_both=cfg.drop_both))
        timesteps = torch.randint(0, frozen.scheduler.config.num_train_timesteps, (b * world,),
                                  generator=generator)[mine].to(device)

        # subject encodings: the reference, its positive view and, for image-dropped rows, the blank
        # reference, at the same timestep, through each frozen and trainable encoder once (per-sample
        # models: the same values as separate calls); a blank image's CLIP features are computed once
        with torch.no_grad():
            views = torch.cat([reference, positive])                                   # (2B, 3, H, W)
            clip_both = clip_hidden_states(frozen.clip_vision, views, layers)
            app_ref, app_pos = appearance_features(frozen.appearance, views).float().chunk(2)
        dropped = int(drop_image.sum())                  # drop_image lives on the CPU: no device read
        hidden, steps = clip_both, timesteps.float().repeat(2)
        if dropped:
            rows = drop_image.nonzero().squeeze(1).to(device)                          # image-dropped rows
            blank_hidden = self._blank_features(reference, clip_both.dtype)
            hidden = torch.cat([hidden, blank_hidden.expand(len(rows), -1, -1, -1)])
            steps = torch.cat([steps, timesteps[rows].float()])
        parts = _split(encoder(hidden, steps), [b, b, dropped] if dropped else [b, b])   # no empty part
        enc, enc_pos = parts[:2]
        splus, visual = enc.splus, enc.visual_tokens
        if dropped:
            blank = parts[2]
            splus = splus.index_copy(0, rows, blank.splus)
            visual = visual.index_copy(0, rows, blank.visual_tokens)

        # prompts encoded once per S+ group, the placeholder replaced by that group's S+ token
        captions = ["" if drop else caption for caption, drop in zip(batch["caption"], drop_text.tolist())]
        tokens = frozen.text.tokenize(captions, PLACEHOLDER)
        contexts, _ = frozen.text(tokens, splus)
        contexts = rearrange(contexts, "(g b) t c -> g b t c", b=b)
        added = self._added_conditions(tokens, b, device)

        # diffusion reconstruction of the target view (another frame of the subject)
        with torch.no_grad():
            target = batch["target"].to(device, dtype=next(frozen.vae.parameters()).dtype)
            mean, std = vae_latent_moments(frozen.vae, target)
            shape = (b * world, *mean.shape[1:])
            eps = torch.randn(shape, generator=generator)[mine].to(mean)
            latents = (mean + std * eps) * frozen.vae.config.scaling_factor
        noise = torch.randn(shape, generator=generator)[mine].to(latents)
        noisy = frozen.scheduler.add_noise(latents, noise, timesteps).to(latents)
        state = self.state
        state.reset()
        state.contexts, state.visual_tokens, state.slots = contexts.unbind(0), visual, tokens.slots
        state.visual_kv = project_visual_kv(self.model.visual_kv, visual)
        state.latent_hw, state.capture = tuple(latents.shape[-2:]), True
        state.visual_maps = cfg.loc_maps == "combined"     # L_loc's Ā: the inference masks' text + visual map
        pred = frozen.unet(noisy, timesteps, encoder_hidden_states=contexts[0], added_cond_kwargs=added).sample
        ldm_target = noise if frozen.scheduler.config.prediction_type == "epsilon" \
            else frozen.scheduler.get_velocity(latents, noise, timesteps).to(latents)
        terms = {"ldm": F.mse_loss(pred.float(), ldm_target.float())}

        # contrastive terms over the whole (all-process) batch; a term left out of the loss is only logged
        grad = torch.is_grad_enabled()
        with torch.set_grad_enabled(grad and "cscl" in cfg.contrastive_terms):
            terms["cscl"] = cscl_loss(gather_with_grad(enc.visual_cls_embed.float()),
                                      gather_with_grad(enc.text_cls_embed.float()), temperature=cfg.cscl_temperature)
        with torch.set_grad_enabled(grad and "macl" in cfg.contrastive_terms):
            terms["macl"] = macl_loss(gather_with_grad(enc.splus.float()), gather_with_grad(enc_pos.splus.float()),
                                      gather_with_grad(app_ref), gather_with_grad(app_pos),
                                      temperature=cfg.macl_temperature, r_min=cfg.r_min)
        terms["loc"] = self._localization(batch["target_mask"].to(device), tokens.slots, drop_image.tolist())
        # the processors' inputs stay in ``state`` until ``release``: gradient-checkpointed UNet blocks run
        # their forward again during the backward pass and read them there
        # each process sees all negatives but back-propagates only its rows; DDP averages over processes,
        # so the contrastive weight is scaled by the process count to give the single-process gradient
        trained = {k: v for k, v in terms.items() if k not in ("cscl", "macl") or k in cfg.contrastive_terms}
        loss = total_loss(trained, lambda_contrast=cfg.lambda_contrast * world, lambda_loc=cfg.lambda_loc)
        return loss, terms

    def release(self) -> None:
        """Drops the last step's processor inputs (contexts, visual tokens, visual K/V); call after backward."""
        self.state.contexts = self.state.visual_tokens = self.state.visual_kv = None
        self.state.reset()

    def _blank_features(self, reference: Tensor, dtype: torch.dtype) -> Tensor:
        """CLIP-vision features of a blank (all-zero) reference, computed once per device, dtype and size:
        the vision model is frozen, so they never change. Shapes: -> (1, K, T, D)."""
        key = (reference.device, dtype, tuple(reference.shape[1:]))
        if key not in self._blank_hidden:
            with torch.no_grad():
                blank = torch.zeros_like(reference[:1])
                features = clip_hidden_states(self.frozen.clip_vision, blank, self.model.config.clip_layers)
            self._blank_hidden[key] = features.to(dtype)
        return self._blank_hidden[key]

    def _added_conditions(self, tokens, b: int, device: torch.device) -> dict[str, Tensor] | None:
        """SDXL's pooled text embedding and size/crop ids (original = target = training size, no crop)."""
        unet = self.frozen.unet
        if getattr(unet.config, "addition_embed_type", None) != "text_time":
            return None
        with torch.no_grad():
            pooled = self.frozen.text.pooled(tokens)    # no S+: the rule the ComfyUI node follows (pooled_prompt_ids)
        size = self.cfg.target_size
        time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=pooled.dtype, device=device).expand(b, -1)
        return {"text_embeds": pooled.to(device), "time_ids": time_ids}

    def _localization(self, target_mask: Tensor, slots, dropped_image: list[bool]) -> Tensor:
        """L_loc (Eq. 8, FastComposer's balanced form) of Ā (``location_map``: by default the inference masks'
        text + visual map) against the target view's subject mask, over the rows whose prompt has the placeholder;
        with the combined map only rows with their reference (a blank reference's visual tokens show no subject).
        Shapes: target_mask (B, 1, H, W) -> scalar."""
        state, combined = self.state, self.cfg.loc_maps == "combined"
        rows = [i for i, s in enumerate(slots) if s and not (combined and dropped_image[i])]
        if not state.maps or not rows:
            return target_mask.new_zeros(())
        names = list(state.maps)
        avg = location_map([state.maps[n].text for n in names],
                           [state.maps[n].visual for n in names] if combined else None,
                           [state.grids[n] for n in names])                                        # (B, H, W)
        mask = F.interpolate(target_mask.float(), size=tuple(avg.shape[-2:]), mode="area") > 0.5   # (B, 1, H, W)
        index = torch.tensor(rows, device=avg.device)
        return localization_loss(rearrange(avg[index], "b h w -> b (h w)"),
                                 rearrange(mask[index], "b 1 h w -> b (h w)").float())
