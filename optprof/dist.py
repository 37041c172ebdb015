"""Distributed trials: N ranks with torch.distributed (DDP or FSDP2), spawned locally or joined under torchrun.

Each rank runs the same trial on its own device (or CPU, with gloo) and reports its own row; rank rows
are then folded into one: tokens/s summed over ranks, the largest peak, per-rank figures under `ranks`.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from dataclasses import dataclass
from typing import Any

from optprof.measure.trial import TrialOutcome, TrialSpec, run_trial
from optprof.quiet import quiet_libraries
from optprof.results import STATUS_OK, CompareRow, RankFigures

STRATEGIES = ("ddp", "fsdp")


def shard_fsdp(model: Any, mesh: Any) -> None:
    """FSDP2 as it is usually applied: each transformer block its own unit (transformers names the block
    classes in `_no_split_modules`), then the root for the rest (embeddings, final norm, head)."""
    from torch.distributed.fsdp import fully_shard

    blocks = set(getattr(model, "_no_split_modules", None) or ())
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)


def wrap_for_strategy(model: Any, strategy: str, device_type: str, device_index: int | None) -> Any:
    """The model as the ranks train it: DDP replicates it, FSDP2 shards it in place."""
    import torch.distributed as dist

    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device_index] if device_type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh

    shard_fsdp(model, init_device_mesh(device_type, (dist.get_world_size(),)))
    return model


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass(frozen=True)
class RankSpec:
    trial: TrialSpec
    rank: int
    world_size: int
    master_port: int


def rank_in_child(spec: RankSpec, progress: Any, quiet: bool = True) -> TrialOutcome:
    """Entry point of one spawned rank: join the group, run the trial, leave the group."""
    import torch
    import torch.distributed as dist

    from optprof.optimizers.registry import adam_mini_on_cpu_ranks

    if quiet:
        quiet_libraries()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(spec.master_port), RANK=str(spec.rank),
                      WORLD_SIZE=str(spec.world_size), LOCAL_RANK=str(spec.rank))
    cuda = spec.trial.training.device == "cuda"
    if not cuda:  # ranks share the cores instead of each taking all of them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // spec.world_size))
    dist.init_process_group("nccl" if cuda else "gloo", rank=spec.rank, world_size=spec.world_size)
    try:
        with adam_mini_on_cpu_ranks():
            return run_trial(spec.trial, progress, rank=spec.rank)
    finally:
        dist.destroy_process_group()


def fold_ranks(rows: list[CompareRow], strategy: str) -> CompareRow:
    """One row for the group: rank 0's, with tokens/s summed, the largest peak and every rank's figures."""
    first = rows[0]
    ranks = tuple(RankFigures(i, r.status, r.peak_bytes, r.state_bytes, r.tokens_per_s, r.step_s_p50,
                              r.tensor_peak_bytes, r.torch_max_reserved_bytes, r.nvml_process_peak_bytes,
                              r.rss_peak_bytes, r.loss_first, r.loss_last) for i, r in enumerate(rows))
    folded = dataclasses.replace(first, world_size=len(rows), strategy=strategy, ranks=ranks,
                                 state_bytes=first.state_logical_bytes)
    broken = next(((i, r) for i, r in enumerate(rows) if r.status != STATUS_OK), None)
    if broken is not None:
        index, row = broken
        return dataclasses.replace(folded, status=row.status, reason=f"rank {index}: {row.reason}")
    peaks = [r.peak_bytes for r in rows if r.peak_bytes is not None]
    tokens = [r.tokens_per_s for r in rows if r.tokens_per_s is not None]
    return dataclasses.replace(
        folded,
        tokens_per_s=sum(tokens) if len(tokens) == len(rows) else None,
        step_s_p50=max(r.step_s_p50 or 0.0 for r in rows),  # the slowest rank sets the pace
        step_s_p90=max(r.step_s_p90 or 0.0 for r in rows),
        peak_bytes=max(peaks) if peaks else None,
    )
