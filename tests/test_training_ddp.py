"""Two CPU processes (gloo DDP) with batch b give the gradients of one process with batch 2b, also with CSCL
left out of the loss (the Table 4 ablation), whose CLS projection heads then get no gradient."""
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
from training.step import CSCL_HEADS

CFG = dict(augment=False, drop_image=0.0, drop_text=0.0, drop_both=0.0, steps=1, batch_size=2,
           synthetic_subjects=8)


TERMS = (("cscl", "macl"), ("macl",))


def gradients(cfg: TrainConfig, manifest: Path, rank: int, world: int) -> dict[str, torch.Tensor | None]:
    """The trainable weights' gradients of the second of two steps on the first global batch (DDP checks in the
    second forward that the first reduced every trainable weight's gradient); None where a weight has none."""
    module = build_module(cfg)
    if world > 1:
        module = torch.nn.parallel.DistributedDataParallel(module)
    dataset = SubjectDataset(read_manifest(manifest), DataConfig(reference_size=cfg.reference_size,
                                                                 target_size=cfg.target_size, augment=False))
    batch = global_batches(len(dataset), cfg.batch_size * world, epoch=0, seed=cfg.seed)[0]
    mine = batch[rank * cfg.batch_size:(rank + 1) * cfg.batch_size]
    inner = module.module if world > 1 else module
    for _ in range(2):
        module.zero_grad(set_to_none=True)
        loss, _ = module(default_collate([dataset[i] for i in mine]), torch.Generator().manual_seed(0),
                         rank=rank, world=world)
        loss.backward()
        inner.release()
    return {n: None if p.grad is None else p.grad.clone() for n, p in inner.model.named_parameters()}


def _worker(rank: int, world: int, port: int, manifest: Path, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        grads = [gradients(TrainConfig(**CFG, contrastive_terms=terms), manifest, rank, world) for terms in TERMS]
        if rank == 0:
            torch.save(grads, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(300) if importlib.util.find_spec("pytest_timeout") else (lambda f: f)   # when installed
def test_two_process_gradients_equal_one_process_with_global_batch():
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        manifest = generate_synthetic(tmp / "data", num_subjects=8, views=3, size=64, seed=0)
        port = 29500 + os.getpid() % 1000
        mp.spawn(_worker, args=(2, port, manifest, tmp / "ddp.pt"), nprocs=2, join=True)
        ddp_runs = torch.load(tmp / "ddp.pt", weights_only=True)
        single_runs = [gradients(TrainConfig(**{**CFG, "batch_size": 4}, contrastive_terms=terms), manifest, 0, 1)
                       for terms in TERMS]
    heads = {f"encoder.{head}.{w}" for head in CSCL_HEADS for w in ("weight", "bias")}
    for terms, ddp, single in zip(TERMS, ddp_runs, single_runs):
        assert ddp.keys() == single.keys()
        untrained = {k for k, g in single.items() if g is None}
        assert untrained == {k for k, g in ddp.items() if g is None} == (set() if "cscl" in terms else heads)
        worst = max(((ddp[k] - single[k]).abs().max() / single[k].abs().max().clamp_min(1e-12)).item()
                    for k in single if k not in untrained)
        assert worst < 1e-4, (terms, worst)   # relative to each parameter's largest gradient, fp32 reduction order
