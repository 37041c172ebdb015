"""A distributed trial's rank rows folded into one row, by the rule each figure names in `RANK_FOLD`
(tokens/s and energy summed, peaks the worst rank's, times the slowest rank's), with every rank's own figures
kept under `ranks`."""

from __future__ import annotations

import dataclasses
import statistics
from typing import Any

from optprof.config import Strategy
from optprof.results.rows import RANK_FOLD, CompareRow, FoldRule, RankFigures
from optprof.results.vocab import Status


def rank_figures(rank: int, row: CompareRow) -> RankFigures:
    """One rank's own figures, by keyword from its row."""
    names = [f.name for f in dataclasses.fields(RankFigures) if f.name != "rank"]
    return RankFigures(rank=rank, **{name: getattr(row, name) for name in names})


def _fold(rule: FoldRule, name: str, rows: list[CompareRow]) -> Any:
    values = [getattr(row, name) for row in rows]
    present = [v for v in values if v is not None]
    if rule == FoldRule.SUM and len(present) == len(rows) and present and isinstance(present[0], tuple):
        return tuple(sum(bounds) for bounds in zip(*present, strict=True))  # an interval: bound by bound
    if rule == FoldRule.SUM:
        return sum(present) if len(present) == len(rows) else None
    if rule == FoldRule.MAX:
        return max(present) if present else None
    if rule == FoldRule.MEAN:
        return statistics.fmean(present) if len(present) == len(rows) else None
    if rule == FoldRule.SLOWEST_RANK:
        return getattr(max(rows, key=lambda r: r.step_s_p50 or 0.0), name)
    if rule == FoldRule.PEAK_RANK:
        return getattr(max(rows, key=lambda r: r.tensor_peak_bytes or 0), name)
    if rule == FoldRule.LOGICAL:
        return rows[0].state_logical_bytes
    raise ValueError(f"rule {rule!r} is computed from the folded row")


def fold_ranks(rows: list[CompareRow], strategy: Strategy) -> CompareRow:
    """One row for the group: each figure folded by its rule, every rank's own figures under `ranks`."""
    first = rows[0]
    folded = dataclasses.replace(first, world_size=len(rows), strategy=strategy,
                                 ranks=tuple(rank_figures(i, r) for i, r in enumerate(rows)),
                                 state_bytes=first.state_logical_bytes)
    broken = next(((i, r) for i, r in enumerate(rows) if r.status != Status.OK), None)
    if broken is not None:
        index, row = broken
        return dataclasses.replace(folded, status=row.status, reason=f"rank {index}: {row.reason}")
    figures = {name: _fold(rule, name, rows) for name, rule in RANK_FOLD.items() if rule != FoldRule.DERIVED}
    if strategy == Strategy.ZERO1:  # each rank holds the state of its own parameters: the total is their sum
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
