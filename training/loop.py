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

from .config import RESUMABLE_FIELDS, TrainConfig, read_config_file, resume_mismatch
from .data import DataConfig, EpochBatches, SubjectDataset, generate_synthetic, global_batches, read_manifest
from .models import build_from_paths, build_tiny, clip_vision_record
from .processors import unet_kv_weights
from .report import LossHistory
from .sampling import TrainingSamples
from .schedule import clip_gradients, set_learning_rate
from .state import (CheckpointWriteError, TrainingState, find_checkpoint, kept_checkpoint, load_state,
                    remove_unfinished, save_state, write_failure, write_text_atomic)
from .step import TrainingModule

log = logging.getLogger(__name__)
EXPORT_NAME = "customcontrast.safetensors"


class TrainingDiverged(FloatingPointError):
    """The loss or the trainable weights became NaN or infinite; nothing of that step is saved or exported."""


def _records(cfg: TrainConfig, out: Path, accelerator) -> list:
    """The subjects to train on: the synthetic ones (written once) or the manifest's, checked against the
    config's ``allow_single_view`` (subjects with one image) and ``allow_unmasked`` (subjects without masks)."""
    if cfg.data == "synthetic":
        manifest = out / "data" / "manifest.jsonl"
        if accelerator.is_main_process and not manifest.exists():
            generate_synthetic(out / "data", num_subjects=cfg.synthetic_subjects, views=cfg.synthetic_views,
                               size=cfg.target_size, seed=cfg.seed)
        accelerator.wait_for_everyone()
        return read_manifest(manifest)
    if not cfg.data:
        raise ValueError("no training data: set data to a JSONL manifest (see training.prepare) or 'synthetic'")
    records = read_manifest(cfg.data, allow_single=cfg.allow_single_view)
    unmasked = [r.subject for r in records if r.masks is None]
    if unmasked:
        what = (f"{len(unmasked)} of the {len(records)} subjects of {cfg.data} have no masks (first: "
                f"{unmasked[0]!r}): their reference and positive views would be the whole image, not the segmented "
                "subject, and L_loc's subject mask the whole image")
        if not cfg.allow_unmasked:
            raise ValueError(f"{what}; make masks with `python -m training.prepare ... --sam CHECKPOINT`, or set "
                             "allow_unmasked=true to train on them as they are")
        if accelerator.is_main_process:
            log.warning("%s (allow_unmasked=true)", what)
    return records


def _batch_iterator(dataset: SubjectDataset, cfg: TrainConfig, epoch: int, start: int, rank: int, world: int):
    """Yields (epoch, index in the epoch, this process's collated rows) from global batch ``start`` of ``epoch``
    on, forever; one DataLoader per epoch, so ``num_workers`` workers start once per epoch and prefetch."""
    while True:
        batches = EpochBatches(dataset, epoch=epoch, batch_size=cfg.batch_size, rank=rank, world=world,
                               seed=cfg.seed)
        indices = range(start, len(batches))
        loader = DataLoader(batches, batch_size=None, sampler=indices, num_workers=cfg.num_workers)
        yield from ((epoch, k, batch) for k, batch in zip(indices, loader))
        epoch, start = epoch + 1, 0


def _resume_position(restored: TrainingState, cfg: TrainConfig, per_epoch: int, world: int) -> tuple[int, int]:
    """(epoch, index in the epoch) of the first global batch a resumed run trains on."""
    if restored.batch is None:   # a checkpoint that predates the recorded position: ``step`` steps, no restarts
        log.info("checkpoint without a recorded data position: continuing after %d x %d micro-batches",
                 restored.step, cfg.grad_accum)
        return divmod(restored.step * cfg.grad_accum, per_epoch)
    epoch, batch = restored.epoch, restored.batch
    if restored.processes != world:   # global batches of another size: continue after the subjects already seen
        seen = batch * restored.processes * cfg.batch_size
        batch = -(-seen // (world * cfg.batch_size))
        log.warning("the checkpoint was written by %d processes, this run has %d: the global batches differ, so "
                    "the run continues at batch %d of epoch %d but not as an uninterrupted run would",
                    restored.processes, world, batch, epoch)
    return (epoch + 1, 0) if batch >= per_epoch else (epoch, batch)


def _check_resumable(config_file: Path, cfg: TrainConfig, checkpoint_dir: Path) -> None:
    """Refuses to resume with a config whose model, data order or step arithmetic differs from the run's."""
    if not config_file.is_file():
        log.warning("resuming from %s without the run's %s: the config cannot be compared", checkpoint_dir,
                    config_file)
        return
    try:
        changed = resume_mismatch(read_config_file(config_file), cfg)
    except ValueError as err:
        raise ValueError(f"cannot resume {checkpoint_dir}: the run's {config_file} is not a valid training config "
                         f"({err}); restore it or train in a new output_dir") from None
    if changed:
        raise ValueError(f"cannot resume {checkpoint_dir} with this config: these fields differ from the run's "
                         f"{config_file} ({'; '.join(changed)}); only {', '.join(RESUMABLE_FIELDS)} may change on "
                         "resume. Train with the new values in a new output_dir (or restore them)")


def nonfinite_tensors(model: torch.nn.Module) -> list[str]:
    """Names of the model's floating-point tensors that hold NaN or Inf."""
    return [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]


def _diverged(step: int, what: str, cfg: TrainConfig) -> TrainingDiverged:
    return TrainingDiverged(f"training diverged at step {step}: {what}; nothing of this step is saved or exported "
                            f"and {kept_checkpoint(Path(cfg.output_dir) / 'checkpoints')} (lower lr, now {cfg.lr:g}, "
                            "and resume from it with --resume latest)")


def _check_loss(step: int, loss: torch.Tensor, terms: dict, model: torch.nn.Module, cfg: TrainConfig,
                accelerator) -> None:
    """Stops every process (TrainingDiverged) when the loss of ``step`` is NaN or infinite on any of them."""
    finite = math.isfinite(loss.item())
    if accelerator.num_processes > 1:   # all stop together: one process alone would leave the others waiting
        flags = accelerator.reduce(torch.tensor(float(finite), device=accelerator.device), reduction="sum")
        finite = flags.item() == accelerator.num_processes
    if finite:
        return
    values = {"loss": loss.item(), **{k: v.item() for k, v in terms.items()}}
    bad = [f"{k} {v}" for k, v in values.items() if not math.isfinite(v)]
    good = [f"{k} {v:.4g}" for k, v in values.items() if math.isfinite(v)]
    weights = nonfinite_tensors(model)
    what = f"non-finite: {', '.join(bad)}" if bad else "the loss is non-finite on another process"
    if good:
        what += f" (finite: {', '.join(good)})"
    if weights:
        what += f"; the weights {weights[:3]} ({len(weights)} tensors) hold NaN or Inf"
    raise _diverged(step, what, cfg)


def _export(cfg: TrainConfig, model: CustomContrastModel, step: int) -> Path:
    """Writes the file the ComfyUI nodes load; a failed write names the path and what is kept."""
    out = Path(cfg.output_dir)
    path = out / EXPORT_NAME
    try:
        return checkpoint.save(path, model, step=step, extra={"train_config": cfg.to_json()},
                               clip_vision=clip_vision_record(cfg, model.config))
    except (OSError, RuntimeError) as err:
        why = str(err) if str(path) in str(err) else write_failure(path, err)
        raise CheckpointWriteError(f"{why}; the training checkpoint of step {step} is complete: "
                                   f"`python -m training.export {out} --out {path}` writes this file once there is "
                                   "space") from err


def _save(cfg: TrainConfig, model: CustomContrastModel, optimizer, state: TrainingState, history: LossHistory) -> None:
    """The history first (every step of a saved checkpoint is then in it; a resumed run drops the rows after
    its checkpoint and trains those steps again), then the training checkpoint, then the export."""
    root = Path(cfg.output_dir) / "checkpoints"
    try:
        history.flush()
    except OSError as err:
        raise CheckpointWriteError(f"{write_failure(history.folder / 'history.jsonl', err)}; "
                                   f"{kept_checkpoint(root)}") from err
    save_state(root, model, optimizer, state, keep=cfg.keep_checkpoints)
    _export(cfg, model, state.step)


def build_module(cfg: TrainConfig) -> TrainingModule:
    """Builds the trainable model (visual K/V initialised from the UNet) around the frozen models."""
    enc_config = get_preset(cfg.encoder_preset)
    if cfg.tiny_weights:     # trained tiny models (the small world's base model)
        from .miniworld.base import load_base
        frozen = load_base(cfg.tiny_weights, enc_config, image_size=cfg.target_size, reference_size=cfg.reference_size)
    elif cfg.tiny_models:
        frozen = build_tiny(enc_config, image_size=cfg.target_size, reference_size=cfg.reference_size, seed=cfg.seed)
    else:
        frozen = build_from_paths(enc_config, cfg.paths)
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


def data_config(cfg: TrainConfig) -> DataConfig:
    """How samples are cut from the views for the run ``cfg``."""
    return DataConfig(reference_size=cfg.reference_size, target_size=cfg.target_size, augment=cfg.augment,
                      hflip=cfg.hflip, reference_jitter=cfg.reference_jitter, seed=cfg.seed)


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
    ckpt_root = out / "checkpoints"
    found = find_checkpoint(ckpt_root, resume) if resume else None
    if resume and found is None:
        log.warning("--resume %s: no complete checkpoint under %s, starting from step 0", resume, ckpt_root)
    if found is not None:
        _check_resumable(out / "config.json", cfg, found)
    accelerator.wait_for_everyone()   # every process has read the saved config before it is replaced
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        removed = remove_unfinished(out, EXPORT_NAME)
        if removed:
            log.info("removed %d temporary files of interrupted saves: %s", len(removed), [str(p) for p in removed])
        write_text_atomic(out / "config.json", cfg.to_json())
    records = _records(cfg, out, accelerator)
    dataset = SubjectDataset(records, data_config(cfg))
    rank, world = accelerator.process_index, accelerator.num_processes
    per_epoch = len(global_batches(len(dataset), cfg.batch_size * world, epoch=0, seed=cfg.seed))
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
    log.info("process %d of %d on %s", rank, world, accelerator.device)

    step, epoch, index, micro_batches = 0, 0, 0, 0
    generator = torch.Generator().manual_seed(cfg.seed)
    if found is not None:
        restored = load_state(found, module.model, optimizer)
        step, micro_batches = restored.step, restored.micro_batches or restored.step * cfg.grad_accum
        epoch, index = _resume_position(restored, cfg, per_epoch, world)
        generator.set_state(restored.generator_state)
        log.info("resumed from %s at step %d (epoch %d, batch %d)", found, step, epoch, index)
    module, optimizer = accelerator.prepare(module, optimizer)
    unwrapped = accelerator.unwrap_model(module)
    batches = _batch_iterator(dataset, cfg, epoch, index, rank, world)
    history = LossHistory(out / "logs", enabled=accelerator.is_main_process,
                          resume_step=step if found is not None else None, log_every=cfg.log_every)
    samples = TrainingSamples(cfg, records[0], out / "samples") \
        if cfg.sample_every and accelerator.is_main_process else None   # the manifest's first subject
    export_path, saved = out / EXPORT_NAME, None
    bar = tqdm(total=cfg.steps, initial=step, disable=not accelerator.is_main_process, desc="training")
    while step < cfg.steps:
        epoch, index, batch = next(batches)
        micro_batches += 1
        with accelerator.accumulate(module):
            with accelerator.autocast():
                loss, terms = module(batch, generator, rank=rank, world=world)
            _check_loss(step + 1, loss, terms, unwrapped.model, cfg, accelerator)
            accelerator.backward(loss)
            unwrapped.release()
            grad_norm = clip_gradients(accelerator, module.parameters(), cfg.max_grad_norm)
            lr = set_learning_rate(optimizer, cfg, step)
            optimizer.step()
            optimizer.zero_grad()
        if accelerator.sync_gradients:
            step += 1
            values = {"loss": loss.item(), **{k: v.item() for k, v in terms.items()}}
            if grad_norm is not None:
                values["grad_norm"] = grad_norm
            means = history.add(step, values, last=step == cfg.steps, scalars={"lr": lr})
            bar.update(1)
            if means:
                bar.set_postfix({k: f"{v:.3g}" for k, v in means.items()})
            if samples is not None and step % cfg.sample_every == 0:
                with accelerator.autocast():
                    history.add_image("samples", samples(unwrapped.frozen, unwrapped.model, step)[1], step)
            if step % cfg.save_every == 0 or step == cfg.steps:
                bad = nonfinite_tensors(unwrapped.model)   # the same on every process: all stop together
                if bad:
                    raise _diverged(step, f"the trainable weights {bad[:3]} ({len(bad)} tensors) hold NaN or Inf "
                                          "after the optimizer step", cfg)
                accelerator.wait_for_everyone()
                if accelerator.is_main_process:
                    after = (epoch, index + 1) if index + 1 < per_epoch else (epoch + 1, 0)   # the next batch
                    _save(cfg, unwrapped.model, optimizer,
                          TrainingState(step=step, epoch=after[0], batch=after[1], micro_batches=micro_batches,
                                        processes=world, generator_state=generator.get_state()), history)
                saved = step
    if saved != step and accelerator.is_main_process:   # resumed with no step left: the export of that step
        _export(cfg, unwrapped.model, step)
    batches.close()
    bar.close()
    history.close()
    accelerator.wait_for_everyone()
    return export_path
