"""Statistics over the timed steps: percentiles, phase means and throughput, as a row's keyword figures."""

from __future__ import annotations

import statistics
from typing import Any

from optprof.measure.step import StepTimes


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), q in [0, 1]."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def timing_figures(times: list[StepTimes], tokens_per_step: int) -> dict[str, Any]:
    """A compare row's time figures: median and p90 step, mean phases, the optimizer's share, tokens/s at the
    median step (tokens_per_step: every token of one optimizer step, all micro-batches)."""
    totals = [s.total_s for s in times]
    step_p50 = percentile(totals, 0.5)
    optimizer_s = statistics.fmean(s.optimizer_s for s in times)
    return {
        "tokens_per_s": tokens_per_step / step_p50,
        "step_s_p50": step_p50,
        "step_s_p90": percentile(totals, 0.9),
        "forward_s": statistics.fmean(s.forward_s for s in times),
        "backward_s": statistics.fmean(s.backward_s for s in times),
        "clip_s": statistics.fmean(s.clip_s for s in times),
        "optimizer_s": optimizer_s,
        "optimizer_share": optimizer_s / statistics.fmean(totals),
        "step_times_s": tuple(totals),
    }
