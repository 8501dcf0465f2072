"""Oracles: how close to a held-out subject the small world gets when something is fitted to that subject (its
reference scene, everything else frozen), or when CustomContrast has trained on it. They say which part of the
system limits CustomContrast:

- ``dreambooth``: the whole base UNet fine-tuned on the reference scene with its class-word caption (DreamBooth,
  Ruiz et al. 2023, without prior preservation); it generates from class-word prompts. Can the base model's
  weights draw the subject at all?
- ``cross_attention``: the same with only the UNet's cross-attention layers (``attn2``: to_q, to_k, to_v, to_out)
  fitted, as Custom Diffusion (Kumari et al. 2023) does. Every conditioning CustomContrast injects reaches the
  UNet through these layers: can they alone carry the subject into new contexts?
- ``adapter``: a trained CustomContrast's image features (the Visual Q-Former's output) and its visual K/V fitted
  to the reference, the MFI-Encoder's other weights and the base frozen; it generates as CustomContrast does
  (placeholder prompts, S+ and the visual branch). How much can CustomContrast's own conditioning carry, when
  it does not have to come from one shot of a shared encoder?
- ``shared_kv``: the adapter oracle with one set of visual K/V for all the subjects, fitted jointly, each subject
  with its own fitted image features. Do shared K/V limit it, or the features a shared encoder produces?
- ``memorized``: CustomContrast trained by ``training.run`` (the world's config, full Eq. 9) on the held-out
  subjects themselves, with every scene the evaluation scores (reference and real renders) as its training
  views, then used one-shot as usual. How much does the one-shot model carry for subjects it has seen, i.e.
  is the limit that the encoder must generalise to new subjects, or what it learns to carry at all?

    python -m training.miniworld.oracles --out runs/miniworld      # after the world, base, scorers, train stages

writes ``<out>/report/oracles.json`` (rows in the report's column names) and ``oracles.md``.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from customcontrast_core import checkpoint
from customcontrast_core.config import get_preset
from customcontrast_core.encoder import ImageFeatures
from customcontrast_core.visual_kv import CustomContrastModel

from ..eval.generate import PLACEHOLDER, reference_view
from ..models import FrozenModels, clip_hidden_states, vae_latent_moments
from ..processors import ProcessorState, install_processors, project_visual_kv
from .base import load_base
from .data import REFERENCE_CONTEXT, EvalCase, read_eval, subject_caption, write_held_out_manifest
from .pipeline import TRAINED_VARIANTS, MiniworldConfig
from .report import GENERATORS, HEADLINE, _load, generate_column, score_column

log = logging.getLogger(__name__)
ORACLES = ("dreambooth", "cross_attention", "adapter", "shared_kv", "memorized")
CROSS_ATTENTION = ".attn2."     # the parameter names of diffusers' cross-attention layers
LOWER = next(g for g in GENERATORS if g.name == "lower bound (base, class word)")
FULL = next(g for g in GENERATORS if g.name == "CustomContrast")


@dataclass(frozen=True)
class OracleConfig:
    subjects: int = 6          # the first held-out subjects
    steps: int = 300           # Adam steps per subject
    batch: int = 8             # noise draws of the reference per step
    unet_lr: float = 1e-4      # dreambooth (5e-4: appearance up, text accuracy down)
    cross_attention_lr: float = 1e-3   # cross_attention: only the attn2 weights move
    feature_lr: float = 2e-2   # adapter: image features
    kv_lr: float = 1e-2        # adapter: visual K/V (1e-3 barely moves them in 300 steps)
    memorized_steps: int = 1500   # memorized: CustomContrast training steps (batch: the world's, at most `subjects`)
    seed: int = 1


def reference_latents(frozen: FrozenModels, case: EvalCase) -> Tensor:
    """The reference scene's scaled latent mean. Shapes: -> (1, 4, h, w)."""
    with torch.no_grad():
        mean, _ = vae_latent_moments(frozen.vae, _load(case.reference)[None] * 2 - 1)
        return mean * frozen.vae.config.scaling_factor


def class_word_context(frozen: FrozenModels, case: EvalCase) -> Tensor:
    """The reference scene's class-word caption, encoded. Shapes: -> (1, 77, C)."""
    with torch.no_grad():
        context, _ = frozen.text(frozen.text.tokenize([REFERENCE_CONTEXT.words(case.subject.shape)], PLACEHOLDER))
        return context


def _draws(frozen: FrozenModels, latents: Tensor, batch: int, g: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """(noisy latents, timesteps, noise) of ``batch`` draws. Shapes: latents (1, C, h, w) -> (B, C, h, w), (B,), ..."""
    noise = torch.randn(batch, *latents.shape[1:], generator=g)
    t = torch.randint(0, frozen.scheduler.config.num_train_timesteps, (batch,), generator=g)
    return frozen.scheduler.add_noise(latents.expand(batch, -1, -1, -1), noise, t), t, noise


def unet_loss(unet: nn.Module, frozen: FrozenModels, latents: Tensor, context: Tensor, batch: int,
              g: torch.Generator) -> Tensor:
    """Epsilon MSE of ``unet`` on ``batch`` noise draws of ``latents`` (``reference_latents``) with ``context``
    (``class_word_context``). Shapes: latents (1, 4, h, w), context (1, 77, C) -> scalar."""
    noisy, t, noise = _draws(frozen, latents, batch, g)
    return F.mse_loss(unet(noisy, t, encoder_hidden_states=context.expand(batch, -1, -1)).sample, noise)


def fit_unet(frozen: FrozenModels, case: EvalCase, cfg: OracleConfig, cross_attention_only: bool = False) -> nn.Module:
    """A copy of the base UNet fine-tuned on ``case``'s reference scene: every weight at ``cfg.unet_lr``, or with
    ``cross_attention_only`` the cross-attention layers' at ``cfg.cross_attention_lr`` (the base's own UNet is
    untouched)."""
    from diffusers.models.attention_processor import AttnProcessor2_0
    unet = copy.deepcopy(frozen.unet)
    unet.set_attn_processor(AttnProcessor2_0())  # plain attention: no processor a sampler may have left
    unet.train().requires_grad_(False)
    params = [p for name, p in unet.named_parameters() if not cross_attention_only or CROSS_ATTENTION in name]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.cross_attention_lr if cross_attention_only else cfg.unet_lr,
                            weight_decay=0.0)
    g = torch.Generator().manual_seed(cfg.seed)
    latents, context = reference_latents(frozen, case), class_word_context(frozen, case)
    for _ in range(cfg.steps):
        loss = unet_loss(unet, frozen, latents, context, cfg.batch, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return unet.eval().requires_grad_(False)


def reference_features(model: CustomContrastModel, frozen: FrozenModels, case: EvalCase, size: int) -> ImageFeatures:
    """``model``'s image features of ``case``'s reference view (as the evaluation builds it)."""
    reference = reference_view(case.reference, case.reference_mask, size, case.subject.shape)
    with torch.no_grad():
        return model.encoder.encode_image(clip_hidden_states(frozen.clip_vision, reference[None],
                                                             model.config.clip_layers))


def placeholder_tokens(frozen: FrozenModels, case: EvalCase, batch: int):
    """The reference scene's placeholder caption, tokenized ``batch`` times (the rows of ``adapter_loss``)."""
    return frozen.text.tokenize([subject_caption(case.subject, REFERENCE_CONTEXT)] * batch, PLACEHOLDER)


def adapter_loss(model: CustomContrastModel, image: ImageFeatures, frozen: FrozenModels, latents: Tensor, tokens,
                 state: ProcessorState, g: torch.Generator) -> Tensor:
    """Epsilon MSE on noise draws of ``latents`` (``reference_latents``; one draw per row of ``tokens``:
    ``placeholder_tokens``), ``image`` of batch 1, conditioned as in training (S+ of ``image`` at each draw's timestep, its visual
    tokens through ``model``'s visual K/V; ``state`` is the processors' state installed on ``frozen.unet`` for
    ``model``)."""
    batch = len(tokens.slots)
    noisy, t, noise = _draws(frozen, latents, batch, g)
    views = image.expand(batch)
    enc = model.encoder.encode_timestep(views, t.float())
    contexts, _ = frozen.text(tokens, enc.splus)
    contexts = rearrange(contexts, "(g b) t c -> g b t c", b=batch)
    state.reset()
    state.contexts, state.visual_tokens, state.slots = contexts.unbind(0), enc.visual_tokens, tokens.slots
    state.visual_kv = project_visual_kv(model.visual_kv, enc.visual_tokens)
    state.latent_hw, state.capture, state.mask, state.gamma = tuple(noisy.shape[-2:]), False, None, 1.0
    try:
        return F.mse_loss(frozen.unet(noisy, t, encoder_hidden_states=contexts[0]).sample, noise)
    finally:
        state.contexts = state.visual_tokens = state.visual_kv = None


def fit_adapter(model: CustomContrastModel, frozen: FrozenModels, case: EvalCase, cfg: OracleConfig,
                size: int) -> tuple[CustomContrastModel, ImageFeatures]:
    """A copy of ``model`` whose visual K/V are fitted to ``case``'s reference scene, and the fitted image
    features (``model`` itself is untouched)."""
    fitted, (image,) = fit_shared_adapter(model, frozen, [case], cfg, size)
    return fitted, image


def fit_shared_adapter(model: CustomContrastModel, frozen: FrozenModels, cases: list[EvalCase], cfg: OracleConfig,
                       size: int) -> tuple[CustomContrastModel, list[ImageFeatures]]:
    """A copy of ``model`` whose visual K/V, one set for all ``cases``, are fitted jointly to their reference
    scenes (the mean of their losses), and each case's own fitted image features (``model`` is untouched)."""
    fitted = copy.deepcopy(model).eval().requires_grad_(False)
    images = []
    for case in cases:
        start = reference_features(fitted, frozen, case, size)
        images.append(ImageFeatures(*(nn.Parameter(x.detach().clone())
                                      for x in (start.features, start.visual, start.visual_cls))))
    fitted.visual_kv.requires_grad_(True)
    features = [x for image in images for x in (image.features, image.visual, image.visual_cls)]
    opt = torch.optim.Adam([{"params": features, "lr": cfg.feature_lr},
                            {"params": list(fitted.visual_kv.parameters()), "lr": cfg.kv_lr}])
    state = ProcessorState()
    processors = frozen.unet.attn_processors
    install_processors(frozen.unet, fitted, state, capture_downsample=())
    g = torch.Generator().manual_seed(cfg.seed)
    data = [(reference_latents(frozen, case), placeholder_tokens(frozen, case, cfg.batch)) for case in cases]
    try:
        for _ in range(cfg.steps):
            loss = sum(adapter_loss(fitted, image, frozen, latents, tokens, state, g)
                       for image, (latents, tokens) in zip(images, data)) / len(cases)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finally:
        frozen.unet.set_attn_processor(processors)
    fitted.requires_grad_(False)
    return fitted, [ImageFeatures(*(x.detach() for x in (image.features, image.visual, image.visual_cls)))
                    for image in images]


def train_memorized(out: Path, cfg: OracleConfig, world: MiniworldConfig) -> Path:
    """CustomContrast trained on the first ``cfg.subjects`` held-out subjects' own evaluation scenes (the
    ``memorized`` oracle), with the world's training config otherwise; cached in ``<out>/oracles``. Returns its
    checkpoint."""
    from ..loop import train
    folder = out / "oracles" / f"memorized_{cfg.subjects}_subjects_{cfg.memorized_steps}_steps"
    ckpt = folder / "run" / "customcontrast.safetensors"
    if not ckpt.is_file():
        data = write_held_out_manifest(folder / "data", world.world, cfg.subjects)
        runs = replace(world, train_steps=cfg.memorized_steps, train_batch=min(world.train_batch, cfg.subjects))
        tc = runs.train_config(out, TRAINED_VARIANTS[0], world.seeds[0])
        train(replace(tc, data=str(data), output_dir=str(folder / "run")))
    return ckpt


def run_oracles(out: Path, which: tuple[str, ...] = ORACLES, cfg: OracleConfig = OracleConfig(),
                world: MiniworldConfig = MiniworldConfig()) -> dict[str, dict]:
    """Fits each oracle per subject, generates the report's prompts and scores them with the world's scorers;
    writes ``report/oracles.json`` and ``report/oracles.md``. Returns {row name: scores}."""
    from .scorers import FILE, load_scorers
    unknown = sorted(set(which) - set(ORACLES))
    if unknown:
        raise ValueError(f"oracles: expected names among {', '.join(ORACLES)}, found {', '.join(unknown)}")
    size = world.world.image_size
    cases = read_eval(out / "world" / "eval")[:cfg.subjects]
    scorers = load_scorers(out / "scorers" / FILE)
    frozen = load_base(out / "base", get_preset(world.encoder_preset), size, size)
    model, _ = checkpoint.load(out / "runs" / f"full_seed{world.seeds[0]}" / "customcontrast.safetensors")
    columns: dict[str, dict] = {"CustomContrast": generate_column(FULL, model, frozen, cases, world)}
    for case in cases:
        if "dreambooth" in which:
            tuned = replace(frozen, unet=fit_unet(frozen, case, cfg))
            columns.setdefault("dreambooth", {}).update(generate_column(LOWER, model, tuned, [case], world))
        if "cross_attention" in which:
            tuned = replace(frozen, unet=fit_unet(frozen, case, cfg, cross_attention_only=True))
            columns.setdefault("cross_attention", {}).update(generate_column(LOWER, model, tuned, [case], world))
        if "adapter" in which:
            fitted, image = fit_adapter(model, frozen, case, cfg, size)
            columns.setdefault("adapter", {}).update(
                generate_column(FULL, fitted, frozen, [case], world, images={case.name: image}))
        log.info("oracles: %s done", case.name)
    if "shared_kv" in which:
        fitted, images = fit_shared_adapter(model, frozen, cases, cfg, size)
        columns["shared_kv"] = generate_column(FULL, fitted, frozen, cases, world,
                                               images={case.name: image for case, image in zip(cases, images)})
    if "memorized" in which:
        memorized, _ = checkpoint.load(train_memorized(out, cfg, world))
        columns["memorized"] = generate_column(FULL, memorized, frozen, cases, world)
    rows = {name: score_column(scorers, cases, column) for name, column in columns.items()}
    report = out / "report"
    report.mkdir(parents=True, exist_ok=True)
    (report / "oracles.json").write_text(json.dumps({"config": asdict(cfg), "rows": rows}, indent=1))
    keys = [f"{s}-{k}" for s in "RE" for k in HEADLINE]
    lines = ["| row | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(f"{r[k]:.3f}" for k in keys) + " |" for name, r in rows.items()]
    (report / "oracles.md").write_text("\n".join(lines) + "\n")
    return rows


def main(argv: list[str] | None = None) -> dict[str, dict]:
    os.environ["HF_HUB_OFFLINE"] = "1"
    parser = argparse.ArgumentParser(prog="python -m training.miniworld.oracles", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/miniworld"), help="a run of python -m training.miniworld")
    parser.add_argument("--which", default=",".join(ORACLES), help=f"comma-separated, among {', '.join(ORACLES)}")
    parser.add_argument("--subjects", type=int, default=OracleConfig.subjects)
    parser.add_argument("--steps", type=int, default=OracleConfig.steps, help="Adam steps of each per-subject fit")
    parser.add_argument("--memorized-steps", type=int, default=OracleConfig.memorized_steps,
                        help="training steps of the memorized oracle's CustomContrast")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    which = tuple(w.strip() for w in args.which.split(",") if w.strip())
    rows = run_oracles(args.out, which, OracleConfig(subjects=args.subjects, steps=args.steps,
                                                      memorized_steps=args.memorized_steps))
    print((args.out / "report" / "oracles.md").read_text())
    return rows


if __name__ == "__main__":
    main()
