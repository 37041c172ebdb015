"""Statistics over the timed steps: percentiles, phase means and throughput, as a row's keyword figures."""

from __future__ import annotations

import math
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


CONFIDENCE = 0.95
STEP_PRECISION = 0.02  # repeated optimizer steps stop once the median's 95% interval is within ±2% of it


def median_ci95(values: list[float]) -> tuple[float, float] | None:
    """A distribution-free 95% interval for the median: the order statistics x(l) and x(n+1-l) with the
    largest l whose binomial tail P(Bin(n, 1/2) < l) stays within 2.5%. Robust to the outliers a shared
    machine produces; None below 6 values, where no such interval reaches 95%."""
    n = len(values)
    tail, low_rank = 0.0, 0
    for rank in range(n):
        tail += math.comb(n, rank) / 2**n  # P(Bin(n, 1/2) <= rank)
        if tail > (1 - CONFIDENCE) / 2:
            break
        low_rank = rank + 1
    if low_rank == 0:
        return None
    ordered = sorted(values)
    return ordered[low_rank - 1], ordered[n - low_rank]


def relative_half_width(values: list[float]) -> float | None:
    """Half the 95% interval of the median, as a fraction of the median."""
    interval = median_ci95(values)
    median = statistics.median(values) if values else 0.0
    return None if interval is None or not median else (interval[1] - interval[0]) / 2 / median


def precise_enough(values: list[float]) -> bool:
    half = relative_half_width(values)
    return half is not None and half <= STEP_PRECISION


def is_different(a: tuple[float, float] | None, b: tuple[float, float] | None) -> bool | None:
    """Whether two 95% intervals support a difference: the difference's interval (interval arithmetic,
    [a_low - b_high, a_high - b_low]) excludes zero, i.e. the intervals do not overlap. None without both."""
    if a is None or b is None:
        return None
    return a[0] > b[1] or b[0] > a[1]


def timing_figures(times: list[StepTimes], tokens_per_step: int) -> dict[str, Any]:
    """A compare row's time figures: median and p90 step, mean phases, the optimizer's share, tokens/s at the
    median step with its 95% interval (tokens_per_step: every token of one optimizer step, all micro-batches)."""
    totals = [s.total_s for s in times]
    step_p50 = percentile(totals, 0.5)
    optimizer_s = statistics.fmean(s.optimizer_s for s in times)
    step_ci = median_ci95(totals)
    return {
        "tokens_per_s": tokens_per_step / step_p50,
        "tokens_per_s_ci95": None if step_ci is None else (tokens_per_step / step_ci[1], tokens_per_step / step_ci[0]),
        "step_s_p50": step_p50,
        "step_s_p90": percentile(totals, 0.9),
        "forward_s": statistics.fmean(s.forward_s for s in times),
        "backward_s": statistics.fmean(s.backward_s for s in times),
        "clip_s": statistics.fmean(s.clip_s for s in times),
        "optimizer_s": optimizer_s,
        "optimizer_share": optimizer_s / statistics.fmean(totals),
        "step_times_s": tuple(totals),
    }


def optimizer_step_figures(repetitions: list[float]) -> dict[str, Any]:
    """`optimizer.step()` + zero_grad, repeated on one set of gradients: the median and its 95% interval."""
    if not repetitions:
        return {}
    return {"optimizer_step_s": statistics.median(repetitions), "optimizer_step_s_ci95": median_ci95(repetitions),
            "optimizer_step_repetitions": len(repetitions)}
