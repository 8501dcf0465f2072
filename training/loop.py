"""The training loop: accelerate (one GPU, many, or CPU), accumulation, logging, checkpoints, export."""
from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from customcontrast_core import checkpoint
from customcontrast_core.config import get_preset
from customcontrast_core.visual_kv import CustomContrastModel

from .config import TrainConfig
from .data import DataConfig, SubjectDataset, generate_synthetic, read_manifest
from .models import build_from_paths, build_tiny
from .processors import unet_kv_weights
from .report import LossHistory
from .state import TrainingState, find_checkpoint, load_state, save_state
from .step import TrainingModule

log = logging.getLogger(__name__)
EXPORT_NAME = "customcontrast.safetensors"


def global_batches(num_items: int, global_batch: int, *, epoch: int, seed: int) -> list[list[int]]:
    """Shuffles subjects per epoch (same on every process) and cuts them into global batches."""
    if num_items < global_batch:
        raise ValueError(f"the data has {num_items} subjects, fewer than one global batch of {global_batch} "
                         "distinct subjects (batch_size x processes); add subjects or lower batch_size")
    order = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
    return [order[i:i + global_batch] for i in range(0, num_items - global_batch + 1, global_batch)]


def _records(cfg: TrainConfig, out: Path, accelerator) -> list:
    if cfg.data == "synthetic":
        manifest = out / "data" / "manifest.jsonl"
        if accelerator.is_main_process and not manifest.exists():
            generate_synthetic(out / "data", num_subjects=cfg.synthetic_subjects, views=cfg.synthetic_views,
                               size=cfg.target_size, seed=cfg.seed)
        accelerator.wait_for_everyone()
        return read_manifest(manifest)
    if not cfg.data:
        raise ValueError("no training data: set data to a JSONL manifest (see training.prepare) or 'synthetic'")
    return read_manifest(cfg.data)


def _batch_iterator(dataset: SubjectDataset, cfg: TrainConfig, start_epoch: int, rank: int, world: int):
    epoch = start_epoch
    while True:
        dataset.set_epoch(epoch)
        for batch in global_batches(len(dataset), cfg.batch_size * world, epoch=epoch, seed=cfg.seed):
            mine = batch[rank * cfg.batch_size:(rank + 1) * cfg.batch_size]
            loader = DataLoader(torch.utils.data.Subset(dataset, mine), batch_size=len(mine),
                                num_workers=cfg.num_workers)
            yield epoch, next(iter(loader))
        epoch += 1


def build_module(cfg: TrainConfig) -> TrainingModule:
    """Builds the trainable model (visual K/V initialised from the UNet) around the frozen models."""
    enc_config = get_preset(cfg.encoder_preset)
    frozen = build_tiny(enc_config, image_size=cfg.target_size, reference_size=cfg.reference_size, seed=cfg.seed) \
        if cfg.tiny_models else build_from_paths(enc_config, cfg.paths)
    torch.manual_seed(cfg.seed)
    model = CustomContrastModel(enc_config)
    model.visual_kv.load_from_unet(unet_kv_weights(frozen.unet, model))
    if cfg.gradient_checkpointing and hasattr(frozen.unet, "enable_gradient_checkpointing"):
        frozen.unet.enable_gradient_checkpointing()
    return TrainingModule(model, frozen, cfg)


def make_optimizer(params, cfg: TrainConfig, device: torch.device | str) -> torch.optim.Optimizer:
    """AdamW (paper) or SGD over ``params``; on CUDA AdamW is the fused implementation (a few kernels per
    step for all tensors instead of several per tensor: the step is launch-bound at the paper's batch)."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                             fused=torch.device(device).type == "cuda")


def train(cfg: TrainConfig, *, resume: str | None = None) -> Path:
    """Runs (or resumes) training; returns the exported CustomContrast checkpoint."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from accelerate.state import AcceleratorState

    # accelerate keeps one global state per process; a second train() in the same process (tests, notebooks,
    # the ablation) may ask for another precision, so the mixed-precision state is reset (the process group is kept)
    AcceleratorState._reset_state()
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum,
                              cpu=not torch.cuda.is_available())
    out = Path(cfg.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(cfg.to_json())
    records = _records(cfg, out, accelerator)
    dataset = SubjectDataset(records, DataConfig(reference_size=cfg.reference_size, target_size=cfg.target_size,
                                                 augment=cfg.augment, seed=cfg.seed))
    module = build_module(cfg)
    frozen_dtype = torch.bfloat16 if cfg.mixed_precision == "bf16" else (
        torch.float16 if cfg.mixed_precision == "fp16" else torch.float32)
    for frozen_module in module.frozen.modules():
        frozen_module.to(accelerator.device)
        if frozen_dtype != torch.float32:
            frozen_module.to(dtype=frozen_dtype)
    if module.frozen.unet.config.get("addition_embed_type") == "text_time" or frozen_dtype != torch.float32:
        module.frozen.vae.to(dtype=torch.float32)   # SDXL's VAE is unstable in half precision
    optimizer = make_optimizer(module.parameters(), cfg, accelerator.device)
    log.info("process %d of %d on %s", accelerator.process_index, accelerator.num_processes, accelerator.device)

    ckpt_root = out / "checkpoints"
    step, epoch = 0, 0
    generator = torch.Generator().manual_seed(cfg.seed)
    found = find_checkpoint(ckpt_root, resume) if resume else None
    if resume and found is None:
        log.warning("--resume %s: no complete checkpoint under %s, starting from step 0", resume, ckpt_root)
    if found is not None:
        restored = load_state(found, module.model, optimizer)
        step, epoch = restored.step, restored.epoch
        generator.set_state(restored.generator_state)
        log.info("resumed from %s at step %d", found, step)
    module, optimizer = accelerator.prepare(module, optimizer)
    unwrapped = accelerator.unwrap_model(module)
    rank, world = accelerator.process_index, accelerator.num_processes
    batches = _batch_iterator(dataset, cfg, epoch, rank, world)
    for _ in range(step % max(1, len(global_batches(len(dataset), cfg.batch_size * world, epoch=0, seed=cfg.seed)))):
        next(batches)   # replay the data order up to the resumed step
    history = LossHistory(out / "logs", enabled=accelerator.is_main_process)
    export_path = out / EXPORT_NAME
    bar = tqdm(total=cfg.steps, initial=step, disable=not accelerator.is_main_process, desc="training")
    while step < cfg.steps:
        epoch, batch = next(batches)
        with accelerator.accumulate(module):
            with accelerator.autocast():
                loss, terms = module(batch, generator, rank=rank, world=world)
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"loss is {loss.item()} at step {step}: {{{', '.join(f'{k}: {v.item():.4g}' for k, v in terms.items())}}}")
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        if accelerator.sync_gradients:
            step += 1
            values = {"loss": loss.item(), **{k: v.item() for k, v in terms.items()}}
            history.add(step, values)
            bar.update(1)
            bar.set_postfix({k: f"{v:.3g}" for k, v in values.items()})
            if step % cfg.save_every == 0 or step == cfg.steps:
                accelerator.wait_for_everyone()
                if accelerator.is_main_process:
                    save_state(ckpt_root, unwrapped.model, optimizer,
                               TrainingState(step=step, epoch=epoch, generator_state=generator.get_state()))
                    checkpoint.save(export_path, unwrapped.model, step=step,
                                    extra={"train_config": cfg.to_json()})
                    history.flush()
    bar.close()
    history.close()
    accelerator.wait_for_everyone()
    return export_path
