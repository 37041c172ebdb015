"""The largest micro-batch that fits: pure search logic over a `fits(micro_batch)` probe (no torch here).

Memory grows almost linearly with the micro-batch (activations scale with it; parameters, gradients and
state do not), so two measured peaks predict where the limit falls; the forward+backward peak is used
where the probe has it, because for small batches the step's peak is often in the optimizer step, which
does not grow. The search probes that prediction and
its neighbour, and falls back to doubling and bisection when it has no usable prediction or a prediction
has missed twice. Every probe is a full training step in a fresh process, so probes are kept few: with
peaks that grow linearly, 1 and 2 and then the predicted maximum and the size above it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from optprof.results.rows import Probe

MISSES_BEFORE_FALLBACK = 2  # predictions that were wrong before the search stops trusting them


@dataclass(frozen=True)
class SearchResult:
    max_micro_batch: int  # 0 when micro-batch 1 does not fit
    chosen_micro_batch: int  # the largest within the margin (== max without one)
    probes: tuple[Probe, ...]  # in the order they ran
    capped: bool  # the cap itself fits: the true maximum may be larger

    @property
    def trials(self) -> int:
        return len(self.probes)


def probe_limit(probes: dict[int, Probe]) -> int | None:
    return next((p.limit_bytes for p in probes.values() if p.limit_bytes is not None), None)


def predict_max(probes: dict[int, Probe], limit_bytes: int | None = None) -> int | None:
    """The largest micro-batch whose peak stays under the limit (the probes', unless given), on the line
    through the two largest measured points; None without a limit, two measured points or a rising peak."""
    limit_bytes = probe_limit(probes) if limit_bytes is None else limit_bytes
    measured = sorted((b, p.growing_bytes) for b, p in probes.items() if p.growing_bytes is not None)
    if len(measured) < 2:
        measured = sorted((b, p.peak_bytes) for b, p in probes.items() if p.peak_bytes is not None)
    if limit_bytes is None or len(measured) < 2:
        return None
    (b1, m1), (b2, m2) = measured[-2], measured[-1]
    slope = (m2 - m1) / (b2 - b1)  # bytes per sequence
    if slope <= 0:
        return None  # the peak is not in the part that grows with the batch (yet)
    return int((limit_bytes - (m2 - slope * b2)) // slope)


def search_max_micro_batch(
    fits: Callable[[int], Probe],
    *,
    cap: int,
    start: int | None = None,
    margin: float = 0.0,
) -> SearchResult:
    """Find the largest micro-batch in [1, cap] for which `fits` says yes (fits is assumed monotone).

    `start` is a first guess (a prediction); `margin` (a fraction of the probes' limit) picks, besides
    the maximum, the largest size whose peak leaves that much headroom.
    """
    if cap < 1:
        raise ValueError("cap must be at least 1")
    probes: dict[int, Probe] = {}
    order: list[Probe] = []
    largest_fit, smallest_miss = 0, cap + 1  # largest known to fit; smallest known not to (or beyond the cap)
    misses = 0
    candidate = min(max(start or 1, 1), cap)
    while largest_fit + 1 < smallest_miss:
        size = min(max(candidate, largest_fit + 1), smallest_miss - 1)
        probe = fits(size)
        if probe.micro_batch != size:
            raise ValueError(f"fits({size}) answered for micro-batch {probe.micro_batch}")
        probes[size] = probe
        order.append(probe)
        expected = _expected(probes, size)
        if expected is not None and expected != probe.fits:
            misses += 1
        if probe.fits:
            largest_fit = size
        else:
            smallest_miss = size
        candidate = _next_candidate(probes, largest_fit, smallest_miss, cap, misses, start)
    chosen = _within_margin(probes, largest_fit, margin)
    return SearchResult(largest_fit, chosen, tuple(order), capped=largest_fit == cap)


def _expected(probes: dict[int, Probe], size: int) -> bool | None:
    """What the prediction from the other probes said about `size` (None: no prediction)."""
    others = {b: p for b, p in probes.items() if b != size}
    predicted = predict_max(others, probe_limit(probes))
    return None if predicted is None else size <= predicted


def _next_candidate(probes: dict[int, Probe], largest_fit: int, smallest_miss: int, cap: int, misses: int,
                    start: int | None) -> int:
    if start is not None and len(probes) == 1:  # the guess is a predicted maximum: check its neighbour
        return start + 1 if largest_fit == start else start - 1
    predicted = predict_max(probes) if misses < MISSES_BEFORE_FALLBACK else None
    if predicted is not None:
        # Probe the predicted maximum; once it is known to fit, the size above it settles the answer.
        return largest_fit + 1 if predicted <= largest_fit else min(predicted, smallest_miss - 1)
    if smallest_miss > cap:
        return min(2 * largest_fit, cap)  # no miss yet: grow
    return (largest_fit + smallest_miss) // 2  # bisect


def _within_margin(probes: dict[int, Probe], largest_fit: int, margin: float) -> int:
    limit_bytes = probe_limit(probes)
    if margin <= 0 or limit_bytes is None or largest_fit == 0:
        return largest_fit
    headroom_limit = int(limit_bytes * (1.0 - margin))
    measured = [b for b, p in probes.items() if p.fits and p.peak_bytes is not None and p.peak_bytes <= headroom_limit]
    predicted = predict_max(probes, headroom_limit)
    best = max(measured, default=0)
    if predicted is not None:
        best = max(best, min(predicted, largest_fit))
    return max(best, 1)  # when even 1 eats into the headroom, 1 is still the size that fits
