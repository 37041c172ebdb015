"""One trial on N ranks with torch.distributed, spawned here or joined under torchrun, folded into one row.

Each rank runs the same trial on its own device (or CPU, with gloo) and reports its own row; the rows then
fold by rule (distributed/folding.py)."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from optprof.config import DeviceKind
from optprof.distributed.folding import fold_ranks
from optprof.distributed.sharding import adam_mini_on_cpu_ranks
from optprof.distributed.torchrun import share_cores
from optprof.measure.trial import TrialOutcome, TrialSpec, run_trial
from optprof.processes.isolated import Isolated, free_port, run_isolated_group
from optprof.quiet import quiet_libraries
from optprof.results.rows import CompareRow


@dataclass(frozen=True)
class RankSpec:
    trial: TrialSpec
    rank: int
    world_size: int
    master_port: int


def rank_in_child(spec: RankSpec, progress: Any, quiet: bool = True) -> TrialOutcome:
    """Entry point of one spawned rank: join the group, run the trial, leave the group."""
    import torch.distributed as dist

    if quiet:
        quiet_libraries()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(spec.master_port), RANK=str(spec.rank),
                      WORLD_SIZE=str(spec.world_size), LOCAL_RANK=str(spec.rank))
    cuda = spec.trial.training.device == DeviceKind.CUDA
    if not cuda:
        share_cores(spec.world_size)
    dist.init_process_group("nccl" if cuda else "gloo", rank=spec.rank, world_size=spec.world_size)
    try:
        with adam_mini_on_cpu_ranks():
            return run_trial(spec.trial, progress, rank=spec.rank)
    finally:
        dist.destroy_process_group()


def run_ranks(spec: TrialSpec, world_size: int, timeout_s: float, progress: Callable[[str], None],
              quiet: bool = True) -> Isolated:
    """One trial on `world_size` ranks, each a fresh spawned process; a rank that fails stops them all. The
    value is the folded TrialOutcome; otherwise the first failing rank's error."""
    assert spec.strategy is not None
    port = free_port()
    arguments = [RankSpec(spec, rank, world_size, port) for rank in range(world_size)]
    results = run_isolated_group(functools.partial(rank_in_child, quiet=quiet), arguments, timeout_s, progress)
    failed = next((r for r in results if r.value is None), None)
    if failed is not None:
        return failed
    outcomes = [r.value for r in results]
    return Isolated(value=TrialOutcome(fold_ranks([o.row for o in outcomes], spec.strategy), outcomes[0].device))


def run_joined(spec: TrialSpec, progress: Callable[[str], None]) -> TrialOutcome:
    """Under torchrun: this process is one rank; every rank runs the trial, rank 0 gets every row and folds."""
    import torch.distributed as dist

    assert spec.strategy is not None
    with adam_mini_on_cpu_ranks():
        outcome = run_trial(spec, progress, rank=dist.get_rank())
    rows: list[CompareRow] | None = [outcome.row] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(outcome.row, rows, dst=0)
    return TrialOutcome(fold_ranks(list(rows or [outcome.row]), spec.strategy), outcome.device)
