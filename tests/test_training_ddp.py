"""Two CPU processes (gloo DDP) with batch b give the gradients of one process with batch 2b."""
import importlib.util
import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import default_collate

from training.config import TrainConfig
from training.data import DataConfig, SubjectDataset, generate_synthetic, read_manifest
from training.loop import build_module, global_batches

CFG = dict(augment=False, drop_image=0.0, drop_text=0.0, drop_both=0.0, steps=1, batch_size=2,
           synthetic_subjects=8)


def gradients(cfg: TrainConfig, manifest: Path, rank: int, world: int) -> dict[str, torch.Tensor]:
    module = build_module(cfg)
    if world > 1:
        module = torch.nn.parallel.DistributedDataParallel(module)
    dataset = SubjectDataset(read_manifest(manifest), DataConfig(reference_size=cfg.reference_size,
                                                                 target_size=cfg.target_size, augment=False))
    batch = global_batches(len(dataset), cfg.batch_size * world, epoch=0, seed=cfg.seed)[0]
    mine = batch[rank * cfg.batch_size:(rank + 1) * cfg.batch_size]
    loss, _ = module(default_collate([dataset[i] for i in mine]), torch.Generator().manual_seed(0),
                     rank=rank, world=world)
    loss.backward()
    inner = module.module if world > 1 else module
    return {n: p.grad.clone() for n, p in inner.model.named_parameters()}


def _worker(rank: int, world: int, port: int, cfg: TrainConfig, manifest: Path, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        grads = gradients(cfg, manifest, rank, world)
        if rank == 0:
            torch.save(grads, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(300) if importlib.util.find_spec("pytest_timeout") else (lambda f: f)   # when installed
def test_two_process_gradients_equal_one_process_with_global_batch():
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        manifest = generate_synthetic(tmp / "data", num_subjects=8, views=3, size=64, seed=0)
        two = TrainConfig(**CFG)
        one = TrainConfig(**{**CFG, "batch_size": 4})
        port = 29500 + os.getpid() % 1000
        mp.spawn(_worker, args=(2, port, two, manifest, tmp / "ddp.pt"), nprocs=2, join=True)
        ddp = torch.load(tmp / "ddp.pt", weights_only=True)
        single = gradients(one, manifest, 0, 1)
    assert ddp.keys() == single.keys()
    worst = max(((ddp[k] - single[k]).abs().max() / single[k].abs().max().clamp_min(1e-12)).item() for k in single)
    assert worst < 1e-4, worst   # relative to each parameter's largest gradient, fp32 reduction order
