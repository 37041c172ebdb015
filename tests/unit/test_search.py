"""The micro-batch search on its own, with fake fits() functions: answers, bounds, caps and trial counts."""

from __future__ import annotations

import math

import pytest

from optprof.commands.micro_batch import predict_max, search_max_micro_batch
from optprof.results.rows import Probe

MB = 10**6


def affine(fixed: int, per_sequence: int, limit: int, seen: list[int] | None = None):  # type: ignore[no-untyped-def]
    """Peak = fixed + per_sequence x micro-batch, as parameters + state + activations."""

    def fits(micro_batch: int) -> Probe:
        if seen is not None:
            seen.append(micro_batch)
        peak = fixed + per_sequence * micro_batch
        return Probe(micro_batch, peak <= limit, peak, limit)

    return fits


def boolean_only(true_max: int, seen: list[int] | None = None):  # type: ignore[no-untyped-def]
    """No peaks at all (every failure an OOM, say): the search must still be right."""

    def fits(micro_batch: int) -> Probe:
        if seen is not None:
            seen.append(micro_batch)
        return Probe(micro_batch, micro_batch <= true_max)

    return fits


def true_max(fixed: int, per_sequence: int, limit: int) -> int:
    return max(0, (limit - fixed) // per_sequence)


@pytest.mark.parametrize("per_sequence", [3 * MB, 7 * MB, 50 * MB])
def test_affine_peaks_exact_answer_within_log2_plus_2_trials(per_sequence: int) -> None:
    fixed = 100 * MB
    for limit in range(fixed, fixed + 300 * per_sequence, per_sequence // 3 + 1):
        expected = min(true_max(fixed, per_sequence, limit), 1024)
        result = search_max_micro_batch(affine(fixed, per_sequence, limit), cap=1024)
        assert result.max_micro_batch == expected, limit
        bound = math.ceil(math.log2(expected)) + 2 if expected >= 1 else 1
        assert result.trials <= bound, (limit, expected, [p.micro_batch for p in result.probes])


def test_boolean_answers_are_right_and_monotone() -> None:
    for expected in range(0, 300):
        seen: list[int] = []
        result = search_max_micro_batch(boolean_only(expected, seen), cap=512)
        assert result.max_micro_batch == expected
        assert len(seen) == len(set(seen))  # never the same size twice
        for size in seen:  # never above a known miss, never at or below a known fit
            earlier = seen[: seen.index(size)]
            assert not any(s <= expected and s >= size for s in earlier)
            assert not any(s > expected and s <= size for s in earlier)
        if expected >= 1:  # doubling, then bisection: about twice log2
            assert result.trials <= 2 * math.ceil(math.log2(expected + 1)) + 2


def test_one_does_not_fit() -> None:
    result = search_max_micro_batch(affine(500 * MB, 10 * MB, 400 * MB), cap=64)
    assert result.max_micro_batch == 0 and result.chosen_micro_batch == 0
    assert [p.micro_batch for p in result.probes] == [1] and not result.probes[0].fits
    assert result.probes[0].peak_bytes == 510 * MB  # 110 MB short: the caller can say so


def test_cap_bounds_the_search() -> None:
    seen: list[int] = []
    result = search_max_micro_batch(affine(0, MB, 10**12, seen), cap=48)
    assert result.max_micro_batch == 48 and result.capped
    assert max(seen) == 48 and result.trials <= 4
    result = search_max_micro_batch(boolean_only(1000), cap=48)
    assert result.max_micro_batch == 48 and result.capped
    assert search_max_micro_batch(boolean_only(1000), cap=1).trials == 1


def test_flat_peaks_then_growth_still_converge() -> None:
    """Small batches peak in the optimizer step (flat); larger ones in backward (growing)."""

    def fits(b: int) -> Probe:
        peak = max(300 * MB, 200 * MB + 20 * MB * b)
        return Probe(b, peak <= 1000 * MB, peak, 1000 * MB)

    result = search_max_micro_batch(fits, cap=1024)
    assert result.max_micro_batch == 40
    assert result.trials <= math.ceil(math.log2(40)) + 2


def test_a_wrong_prediction_falls_back_to_bisection() -> None:
    """Peaks that jump (allocator rounding) mislead the line; the answer must still be right."""

    def fits(b: int) -> Probe:
        peak = 100 * MB + 10 * MB * b + (300 * MB if b > 20 else 0)
        return Probe(b, peak <= 500 * MB, peak, 500 * MB)

    result = search_max_micro_batch(fits, cap=1024)
    assert result.max_micro_batch == 20  # 300 MB at 20; 610 MB at 21, past the jump
    sizes = [p.micro_batch for p in result.probes]
    assert sizes[:3] == [1, 2, 40]  # the line through 1 and 2 says 40: a miss
    assert 21 in sizes and result.trials <= 10


def test_a_prediction_as_start_saves_trials() -> None:
    fixed, per, limit = 100 * MB, 5 * MB, 1100 * MB  # max 200
    cold = search_max_micro_batch(affine(fixed, per, limit), cap=1024)
    warm = search_max_micro_batch(affine(fixed, per, limit), cap=1024, start=190)
    assert cold.max_micro_batch == warm.max_micro_batch == 200
    assert warm.trials <= cold.trials
    exact = search_max_micro_batch(affine(fixed, per, limit), cap=1024, start=200)
    assert [p.micro_batch for p in exact.probes] == [200, 201]  # a right prediction costs two trials
    over = search_max_micro_batch(affine(fixed, per, limit), cap=1024, start=201)
    assert [p.micro_batch for p in over.probes] == [201, 200]


def test_margin_picks_a_smaller_size_with_headroom() -> None:
    fixed, per, limit = 100 * MB, 10 * MB, 1100 * MB  # max 100; 10% headroom: peak <= 990 MB -> 89
    result = search_max_micro_batch(affine(fixed, per, limit), cap=1024, margin=0.10)
    assert result.max_micro_batch == 100 and result.chosen_micro_batch == 89


def test_prediction_needs_two_points_and_a_rising_peak() -> None:
    one = {1: Probe(1, True, 110 * MB, 200 * MB)}
    assert predict_max(one) is None
    two = {1: Probe(1, True, 110 * MB, 200 * MB), 2: Probe(2, True, 120 * MB, 200 * MB)}
    assert predict_max(two) == 10
    assert predict_max(two, 150 * MB) == 5  # an explicit limit (the margin's) wins
    no_limit = {1: Probe(1, True, 110 * MB), 2: Probe(2, True, 120 * MB)}
    assert predict_max(no_limit) is None
    flat = {1: Probe(1, True, 110 * MB, 200 * MB), 2: Probe(2, True, 110 * MB, 200 * MB)}
    assert predict_max(flat) is None
