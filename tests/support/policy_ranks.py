"""A few AdamW steps of a tiny model under FSDP2 with a MixedPrecisionPolicy, on `world` gloo ranks that split one
global batch: the same global update whatever the number of ranks, so 1 rank and 2 ranks must agree."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from optprof.config import Strategy, TrainingSettings
from optprof.distributed.sharding import shard_fsdp
from optprof.measure.step import configure_model
from optprof.model.loading import load_model

STEPS = 4  # the loss before each: after 3 optimizer steps is the last


def train(rank: int, world: int, port: int, model: str, training: TrainingSettings, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        module = load_model(model, device="cpu").module
        configure_model(module, training)
        shard_fsdp(module, init_device_mesh("cpu", (world,)), Strategy.FSDP, training=training)
        optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2)
        tokens = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))
        mine = tokens.chunk(world)[rank]
        losses = []
        for _ in range(STEPS):
            loss = module(input_ids=mine, labels=mine, use_cache=False).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            total = loss.detach().float().clone()
            dist.all_reduce(total)
            losses.append(total.item() / world)
        if rank == 0:
            Path(out).write_text(json.dumps(losses))
        dist.barrier()  # both ranks leave together: a rank destroying its group while the other still talks
        # over it aborted ("terminate called without an active exception") on a loaded machine
    finally:
        dist.destroy_process_group()


def losses(world: int, model: str, training: TrainingSettings, folder: Path) -> list[float]:
    import torch.multiprocessing as mp

    from optprof.processes.isolated import free_port

    out = folder / f"losses-{world}-{training.mp_param}-{training.checkpointing}.json"
    mp.spawn(train, args=(world, free_port(), model, training, str(out)), nprocs=world, join=True)
    return json.loads(out.read_text())  # type: ignore[no-any-return]
