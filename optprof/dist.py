"""Distributed trials: N ranks with torch.distributed, spawned here or joined under torchrun, folded into one row.

Each rank runs the same trial on its own device (or CPU, with gloo) and reports its own row; the rows then
fold by the rule each figure names in `results.RANK_FOLD` (tokens/s and energy summed, peaks the worst
rank's, times the slowest rank's), with every rank's own figures kept under `ranks`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import socket
import statistics
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from optprof.config import DeviceKind, Strategy
from optprof.errors import UsageError
from optprof.measure.isolate import Isolated, run_isolated_group
from optprof.measure.trial import TrialOutcome, TrialSpec, run_trial
from optprof.parallel import adam_mini_on_cpu_ranks
from optprof.quiet import quiet_libraries
from optprof.results import RANK_FOLD, STATUS_OK, CompareRow, FoldRule, RankFigures


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


def _share_cores(world_size: int) -> None:
    """CPU ranks on one machine share its cores instead of each taking all of them."""
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))


def rank_in_child(spec: RankSpec, progress: Any, quiet: bool = True) -> TrialOutcome:
    """Entry point of one spawned rank: join the group, run the trial, leave the group."""
    import torch.distributed as dist

    if quiet:
        quiet_libraries()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(spec.master_port), RANK=str(spec.rank),
                      WORLD_SIZE=str(spec.world_size), LOCAL_RANK=str(spec.rank))
    cuda = spec.trial.training.device == "cuda"
    if not cuda:
        _share_cores(spec.world_size)
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


def torchrun_world_size() -> int | None:
    """The group's size when this process is a torchrun rank (torchrun sets RANK and WORLD_SIZE), else None."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return world if world > 1 and "RANK" in os.environ else None


def ranks_per_node() -> int | None:
    """torchrun's ranks on this node (LOCAL_WORLD_SIZE), None outside torchrun."""
    value = os.environ.get("LOCAL_WORLD_SIZE")
    return int(value) if value and value.isdigit() else None


def resolve_ranks(kind: DeviceKind, gpus: int | None, device_given: bool = True) -> tuple[int, bool]:
    """(ranks per trial, whether this process is already one rank of a torchrun group) for --gpus.

    Several ranks on the CPU only when asked for (`--device cpu`): without CUDA, `--gpus N` of a large model
    would otherwise start N CPU processes that each hold the whole model, until the kernel kills them.
    """
    import torch

    joined = torchrun_world_size()
    if joined is not None and gpus not in (None, joined):
        raise UsageError(f"--gpus {gpus} under torchrun, whose group has {joined} ranks: drop --gpus")
    world = joined or gpus or 1
    if kind == "cpu" and not device_given and joined is None and world > 1:
        raise UsageError(f"--gpus {world}: no CUDA device is available here. Add --device cpu to run {world} CPU "
                         f"ranks (gloo), or run `optprof predict MODEL --gpus {world}` for the per-rank memory "
                         "without a GPU")
    if kind == "cuda" and joined is None and world > torch.cuda.device_count():
        raise UsageError(f"--gpus {world}: only {torch.cuda.device_count()} CUDA devices are visible")
    return world, joined is not None


@contextlib.contextmanager
def torchrun_group(kind: DeviceKind, joined: bool) -> Iterator[bool]:
    """Join torchrun's process group for the duration (when `joined`); yields whether this process writes the
    report: rank 0, or the only process."""
    if not joined:
        yield True
        return
    import torch
    import torch.distributed as dist

    if kind == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:
        _share_cores(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    dist.init_process_group("nccl" if kind == "cuda" else "gloo")
    try:
        yield dist.get_rank() == 0
    finally:
        dist.destroy_process_group()


def rank_figures(rank: int, row: CompareRow) -> RankFigures:
    """One rank's own figures, by keyword from its row."""
    names = [f.name for f in dataclasses.fields(RankFigures) if f.name != "rank"]
    return RankFigures(rank=rank, **{name: getattr(row, name) for name in names})


def _fold(rule: FoldRule, name: str, rows: list[CompareRow]) -> Any:
    values = [getattr(row, name) for row in rows]
    present = [v for v in values if v is not None]
    if rule == "sum" and len(present) == len(rows) and present and isinstance(present[0], tuple):
        return tuple(sum(bounds) for bounds in zip(*present, strict=True))  # an interval: bound by bound
    if rule == "sum":
        return sum(present) if len(present) == len(rows) else None
    if rule == "max":
        return max(present) if present else None
    if rule == "mean":
        return statistics.fmean(present) if len(present) == len(rows) else None
    if rule == "slowest rank":
        return getattr(max(rows, key=lambda r: r.step_s_p50 or 0.0), name)
    if rule == "peak rank":
        return getattr(max(rows, key=lambda r: r.tensor_peak_bytes or 0), name)
    if rule == "logical":
        return rows[0].state_logical_bytes
    raise ValueError(f"rule {rule!r} is computed from the folded row")


def fold_ranks(rows: list[CompareRow], strategy: Strategy) -> CompareRow:
    """One row for the group: each figure folded by its rule, every rank's own figures under `ranks`."""
    first = rows[0]
    folded = dataclasses.replace(first, world_size=len(rows), strategy=strategy,
                                 ranks=tuple(rank_figures(i, r) for i, r in enumerate(rows)),
                                 state_bytes=first.state_logical_bytes)
    broken = next(((i, r) for i, r in enumerate(rows) if r.status != STATUS_OK), None)
    if broken is not None:
        index, row = broken
        return dataclasses.replace(folded, status=row.status, reason=f"rank {index}: {row.reason}")
    figures = {name: _fold(rule, name, rows) for name, rule in RANK_FOLD.items() if rule != "derived"}
    if strategy == "zero1":  # each rank holds the state of its own parameters: the total is their sum
        total = sum(row.state_bytes or 0 for row in rows)
        figures |= {"state_bytes": total, "state_logical_bytes": total}
    folded = dataclasses.replace(folded, **figures,
                                 notes=tuple(dict.fromkeys(note for row in rows for note in row.notes)))
    return dataclasses.replace(folded, joules_per_token=_joules_per_token(folded))


def _joules_per_token(row: CompareRow) -> float | None:
    """The group's energy over the group's tokens in the timed steps."""
    if row.energy_j is None or None in (row.micro_batch, row.seq_len, row.grad_accum, row.steps):
        return None
    tokens = row.micro_batch * row.seq_len * row.grad_accum * row.steps * row.world_size  # type: ignore[operator]
    return row.energy_j / tokens
