"""The small world's base text-to-image model, trained from scratch on the CPU.

The architectures are the ``tiny`` preset's (``training.models.build_tiny``): a latent-diffusion UNet with
SD1.5's block structure (16 cross-attention layers in SD1.5's places), a KL autoencoder (4 latent channels,
4x down) and a CLIP-structured text encoder with CLIP's BPE tokenizer. Choices:
- the autoencoder is trained first, alone (reconstruction + a small KL), then frozen: the UNet needs a
  fixed latent space, as SD's did;
- the text encoder is trained jointly with the UNet, then frozen: a random frozen encoder gives features
  the UNet can read, but learning them makes caption following converge in far fewer CPU steps;
- the CLIP-vision and appearance towers stay random (their weights come from ``build_tiny``'s seed):
  CustomContrast's trainable parts learn to read them, and no scorer shares them.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from customcontrast_core.config import EncoderConfig

from ..models import FrozenModels, build_tiny

log = logging.getLogger(__name__)
PARTS = ("vae", "unet", "text", "clip_vision", "appearance")


@dataclass(frozen=True)
class Cycle:
    """One more cosine cycle of the UNet's training after the first (warm restart, fresh optimizer)."""

    steps: int
    lr: float
    min_snr: float = 0.0    # Min-SNR-gamma loss weight min(SNR, gamma) / SNR (Hang et al. 2023); 0 = plain MSE
    ema: float = 0.0        # the cycle ends on the exponential moving average of its weights (this decay); 0 = off


@dataclass(frozen=True)
class BaseConfig:
    """How the base model is trained."""

    image_size: int = 32
    vae_channels: tuple[int, int, int] = (32, 64, 64)   # build_tiny's (16, 32, 32) blurs a subject's texture away
    vae_steps: int = 2000
    vae_lr: float = 2e-3
    vae_kl: float = 1e-6
    steps: int = 4000
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 200
    # more cosine cycles after the first (none by default). Two more (Cycle(3000, 3e-4), then Cycle(4000, 2e-4,
    # min_snr=5.0, ema=0.999)) make the base draw a subject told in words better (held-out subjects, E-appearance
    # 0.190 -> 0.227 -> 0.269, text accuracy 0.944 -> 0.981), but CustomContrast trained on that base did not
    # carry subjects better (docs/miniworld.md, Status)
    restarts: tuple[Cycle, ...] = ()
    restart_warmup: int = 100
    drop_caption: float = 0.1     # empty prompts, for classifier-free guidance
    offset_noise: float = 0.15    # per-channel constant added to the noise (see train_unet)
    seed: int = 0


def build_base(config: EncoderConfig, image_size: int, reference_size: int, seed: int = 0,
               vae_channels: tuple[int, int, int] = BaseConfig.vae_channels) -> FrozenModels:
    """The base model's architectures: ``build_tiny``'s for ``config`` (random weights)."""
    return build_tiny(config, image_size=image_size, reference_size=reference_size, seed=seed,
                      vae_channels=vae_channels)


def _modules(models: FrozenModels) -> dict[str, torch.nn.Module]:
    return dict(zip(PARTS, (models.vae, models.unet, models.text, models.clip_vision.model, models.appearance.model)))


def load_base(folder: str | Path, config: EncoderConfig, image_size: int, reference_size: int) -> FrozenModels:
    """The trained base model of ``folder`` (every frozen part, the random towers included), frozen."""
    vae_file = Path(folder) / "vae.safetensors"
    trained = json.loads(load_file_metadata(vae_file).get("base_config", "{}")) if vae_file.is_file() else {}
    models = build_base(config, image_size, reference_size, vae_channels=tuple(trained.get("vae_channels", (16, 32, 32))))
    for name, module in _modules(models).items():
        path = Path(folder) / f"{name}.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"no trained base model part at {path}: run `python -m training.miniworld "
                                    "--stages world,base` first")
        missing, unexpected = module.load_state_dict(load_file(str(path)), strict=False)
        if missing or unexpected:
            raise ValueError(f"{path}: expected the weights of the {config.base} tiny architecture, found "
                             f"{len(missing)} missing and {len(unexpected)} unexpected tensors (first: "
                             f"{(missing or unexpected)[0]})")
    scale = json.loads(load_file_metadata(vae_file).get("scaling_factor", "null"))
    if scale is None:
        raise ValueError(f"{Path(folder) / 'vae.safetensors'}: no scaling_factor in its metadata")
    models.vae.register_to_config(scaling_factor=scale)
    return models.freeze()


def _save(folder: Path, name: str, module: torch.nn.Module, meta: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{name}.safetensors.tmp"
    save_file({k: v.detach().contiguous() for k, v in module.state_dict().items()}, str(tmp),
              metadata={k: json.dumps(v) for k, v in meta.items()})
    tmp.replace(folder / f"{name}.safetensors")


def _batches(images: np.ndarray, captions: list[str], batch: int, rng: np.random.Generator):
    while True:
        index = rng.integers(0, len(images), batch)
        x = torch.from_numpy(images[index]).permute(0, 3, 1, 2).float() / 127.5 - 1
        yield x, [captions[i] for i in index]


def train_vae(models: FrozenModels, images: np.ndarray, cfg: BaseConfig) -> list[float]:
    """Trains the autoencoder on the scenes (MSE + L1 + small KL); returns the losses."""
    vae = models.vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    rng = np.random.default_rng([cfg.seed, 1])
    losses = []
    for step, (x, _) in zip(range(cfg.vae_steps), _batches(images, [""] * len(images), cfg.batch_size, rng)):
        for group in opt.param_groups:
            group["lr"] = cfg.vae_lr * min(1.0, (step + 1) / 100) * (0.1 if step > 0.8 * cfg.vae_steps else 1.0)
        dist = vae.encode(x).latent_dist
        z = dist.sample()
        rec = vae.decode(z).sample
        loss = F.mse_loss(rec, x) + F.l1_loss(rec, x) + cfg.vae_kl * dist.kl().mean()   # L1 keeps edges sharp
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 250 == 0:
            log.info("vae step %d: loss %.4f", step, loss.item())
    vae.eval().requires_grad_(False)
    return losses


@torch.no_grad()
def encode_latents(models: FrozenModels, images: np.ndarray, batch: int = 256) -> torch.Tensor:
    """The autoencoder's latent means of every scene, unscaled, encoded once (the autoencoder is frozen).
    Shapes: images (N, H, W, 3) uint8 -> (N, 4, H/4, W/4)."""
    chunks = []
    for i in range(0, len(images), batch):
        x = torch.from_numpy(images[i:i + batch]).permute(0, 3, 1, 2).float() / 127.5 - 1
        chunks.append(models.vae.encode(x).latent_dist.mean)
    return torch.cat(chunks)


@torch.no_grad()
def latent_scale(models: FrozenModels, images: np.ndarray) -> float:
    """1 / std of the latents (SD's ``scaling_factor`` rule), over up to 512 scenes."""
    x = torch.from_numpy(images[:512]).permute(0, 3, 1, 2).float() / 127.5 - 1
    return float(1.0 / models.vae.encode(x).latent_dist.mean.std())


def min_snr_weights(snr: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma weights of the epsilon loss, min(SNR, gamma) / SNR (Hang et al. 2023); all 1 when gamma is 0.
    Shapes: snr (B,) -> (B,)."""
    return snr.clamp(max=gamma) / snr if gamma else torch.ones_like(snr)


def train_unet(models: FrozenModels, images: np.ndarray, captions: list[str], cfg: BaseConfig,
               cycle: Cycle | None = None, index: int = 0) -> list[float]:
    """Trains the UNet and the text encoder jointly (epsilon prediction, caption dropout) for one cosine cycle:
    the first (``cfg.steps`` at ``cfg.lr``) or ``cycle``, the ``index``-th restart (seed ``cfg.seed + index``);
    returns the per-step mean squared errors.

    Offset noise: SD's scaled-linear schedule leaves sqrt(alpha_bar) = 0.068 of the signal at t = 999, so a
    UNet trained on plain Gaussian noise learns to read an image's mean colour from the noise's own mean and
    never to make it from the caption (at 8 x 8 latents that mean is 1/8 of a unit, larger than the signal).
    A per-channel constant in the noise hides the signal's mean, so the colour must come from the text.
    The schedule and the sampler stay SD's, so ComfyUI samples the base as it samples SD1.5."""
    cycle = cycle or Cycle(cfg.steps, cfg.lr)
    warmup, seed = (cfg.restart_warmup, cfg.seed + index) if index else (cfg.warmup, cfg.seed)
    unet, text = models.unet.train().requires_grad_(True), models.text.train().requires_grad_(True)
    params = list(unet.parameters()) + list(text.parameters())
    average = [p.detach().clone() for p in params] if cycle.ema else []
    opt = torch.optim.AdamW(params, lr=cycle.lr, weight_decay=1e-2)
    sched = models.scheduler
    snr = sched.alphas_cumprod / (1 - sched.alphas_cumprod)     # (1000,)
    scale = models.vae.config.scaling_factor
    rng = np.random.default_rng([seed, 2])
    g = torch.Generator().manual_seed(seed)
    all_latents = encode_latents(models, images)
    losses, start = [], time.time()
    for step in range(cycle.steps):
        rows = rng.integers(0, len(images), cfg.batch_size)
        latents, caps = all_latents[rows], [captions[i] for i in rows]
        lr = cycle.lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * step / cycle.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        caps = ["" if rng.uniform() < cfg.drop_caption else c for c in caps]
        noise = torch.randn(latents.shape, generator=g)
        noise = noise + cfg.offset_noise * torch.randn(*latents.shape[:2], 1, 1, generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (len(latents),), generator=g)
        context, _ = text(text.tokenize(caps, "<subject>"))
        pred = unet(sched.add_noise(latents * scale, noise, t), t, encoder_hidden_states=context).sample
        errors = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))          # (B,)
        loss = (min_snr_weights(snr[t], cycle.min_snr) * errors).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if average:
            with torch.no_grad():
                for a, p in zip(average, params):
                    a.lerp_(p, 1 - cycle.ema)
        losses.append(errors.mean().item())
        if step % 100 == 0:
            log.info("unet step %d: loss %.4f (%.2f s/step)", step, np.mean(losses[-100:]),
                     (time.time() - start) / (step + 1))
    with torch.no_grad():
        for a, p in zip(average, params):
            p.copy_(a)
    unet.eval().requires_grad_(False)
    text.eval().requires_grad_(False)
    return losses


def train_base(folder: str | Path, images: np.ndarray, captions: list[str], cfg: BaseConfig,
               config: EncoderConfig) -> FrozenModels:
    """Trains (or, when its parts are on disk, loads) the base model; writes one safetensors file per part."""
    folder = Path(folder)
    models = build_base(config, cfg.image_size, cfg.image_size, cfg.seed, cfg.vae_channels)
    meta = {"base_config": asdict(cfg)}
    vae_file = folder / "vae.safetensors"
    if vae_file.is_file():
        models.vae.load_state_dict(load_file(str(vae_file)))
        models.vae.eval().requires_grad_(False)
    else:
        losses = train_vae(models, images, cfg)
        models.vae.register_to_config(scaling_factor=latent_scale(models, images))
        _save(folder, "vae", models.vae, {**meta, "final_loss": float(np.mean(losses[-50:])),
                                           "scaling_factor": models.vae.config.scaling_factor})
    models.vae.register_to_config(scaling_factor=json.loads(load_file_metadata(vae_file)["scaling_factor"]))
    if not (folder / "unet.safetensors").is_file():
        losses = train_unet(models, images, captions, cfg)
        for index, cycle in enumerate(cfg.restarts, start=1):
            losses = train_unet(models, images, captions, cfg, cycle, index)
        final = {**meta, "final_loss": float(np.mean(losses[-100:]))}
        for name in ("clip_vision", "appearance", "text"):
            _save(folder, name, _modules(models)[name], meta)
        _save(folder, "unet", models.unet, final)   # last: its presence marks the stage complete
    return load_base(folder, config, cfg.image_size, cfg.image_size)


def load_file_metadata(path: str | Path) -> dict[str, str]:
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}
