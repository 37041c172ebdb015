"""What `optprof tune` concludes from its trials: each optimizer's best held-out loss and spread, the noise of
the best, the study's inclusion checks within that noise, and the ranking as the tuning budget grows.

Plain arithmetic on the trials' figures; nothing here runs a model.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

from optprof.measure.stats import median_ci95, percentile
from optprof.results.rows import BudgetRanking, InclusionCheck, TuneRow, TuneTrial
from optprof.results.vocab import Status


def usable(trial: TuneTrial) -> bool:
    """A trial that trained to the end with a held-out loss at or below where it started."""
    return trial.status == Status.OK and not trial.diverged and trial.val_loss is not None


def best_of(trials: Sequence[TuneTrial]) -> TuneTrial | None:
    """The trial with the lowest held-out loss among those that did not diverge."""
    return min((t for t in trials if usable(t)), key=lambda t: t.val_loss or 0.0, default=None)


def trial_figures(trials: Sequence[TuneTrial]) -> dict[str, Any]:
    """A TuneRow's figures over its trials: the best (of those that did not diverge); the median and quartiles
    over every trial that ran, a diverged one at its first loss (as the ranking counts it); the share that
    diverged; tokens/s; and the best's state."""
    ran = [t for t in trials if t.status == Status.OK]
    scores = [s for s in (ranking_score(t) for t in ran) if s is not None]
    best = best_of(ran)
    speeds = [t.tokens_per_s for t in ran if t.tokens_per_s is not None]
    shown = best or (ran[0] if ran else None)  # whose state the row shows: the best's, else any that ran
    return {
        "best_val_loss": best.val_loss if best else None,
        "best_hyperparameters": best.hyperparameters if best else None,
        "best_trial": best.index if best else None,
        "median_val_loss": statistics.median(scores) if scores else None,
        "val_loss_p25": percentile(scores, 0.25) if scores else None,
        "val_loss_p75": percentile(scores, 0.75) if scores else None,
        "diverged_fraction": sum(t.diverged for t in ran) / len(ran) if ran else None,
        "tokens_per_s": statistics.median(speeds) if speeds else None,
        "tokens_per_s_ci95": median_ci95(speeds) if speeds else None,
        "state_bytes": shown.state_bytes if shown else None,
    }


def noise_range(best: TuneTrial | None, reruns: Sequence[TuneTrial]) -> float | None:
    """max - min of the best hyperparameters' held-out loss over its own seed and the re-runs' seeds that
    trained (a re-run that diverged is counted apart: the row says how many); None without a re-run."""
    if best is None or best.val_loss is None or not reruns:
        return None
    values = [best.val_loss, *(r.val_loss for r in reruns if usable(r) and r.val_loss is not None)]
    return max(values) - min(values)


def inclusion_pairs(chains: Sequence[Sequence[str]]) -> list[tuple[str, str]]:
    """(special, general) for every ordered pair of each chain (A ⊆ B ⊆ C gives A⊆B, A⊆C, B⊆C), once each."""
    pairs = [(chain[i], chain[j]) for chain in chains for i in range(len(chain)) for j in range(i + 1, len(chain))]
    return list(dict.fromkeys(pairs))


def inclusion_checks(rows: Sequence[TuneRow], pairs: Sequence[tuple[str, str]]) -> tuple[InclusionCheck, ...]:
    """Each relation whose two optimizers were both tuned: does the general one reach at most the special
    case's best loss, within the larger of their noise ranges (0 where no noise was measured)?"""
    by_name = {row.optimizer: row for row in rows}
    checks = []
    for special, general in pairs:
        if special not in by_name or general not in by_name:
            continue
        s, g = by_name[special].best_val_loss, by_name[general].best_val_loss
        if s is None or g is None:
            checks.append(InclusionCheck(special, general, s, g, None, None, None))
            continue
        noises = [r.noise_range for r in (by_name[special], by_name[general]) if r.noise_range is not None]
        margin = max(noises, default=0.0)
        checks.append(InclusionCheck(special, general, s, g, g - s, margin, g - s <= margin))
    return tuple(checks)


def ranking_score(trial: TuneTrial) -> float | None:
    """What a trial is worth when ranking by budget: its held-out loss, or for one that diverged, the loss it
    started from (it made no progress worth keeping); None for a trial that did not run."""
    if trial.status != Status.OK:
        return None
    return trial.val_loss if usable(trial) else trial.first_loss


def expected_best(scores: Sequence[float], drawn: int) -> float:
    """The expected minimum of `drawn` scores taken without replacement, i.e. averaged over every order of the
    trials: the i-th smallest (1-based) is the minimum with probability C(n-i, k-1) / C(n, k)."""
    ordered = sorted(scores)
    n, total = len(ordered), math.comb(len(ordered), drawn)
    return sum(value * math.comb(n - i, drawn - 1) for i, value in enumerate(ordered, start=1)) / total


def budgets(trials: int) -> list[int]:
    """1, 2, 4, ... up to `trials`, and `trials` itself."""
    sizes = [2**i for i in range(trials.bit_length()) if 2**i <= trials]
    return sizes if sizes and sizes[-1] == trials else [*sizes, trials]


def ranking_by_budget(rows: Sequence[TuneRow]) -> tuple[BudgetRanking, ...]:
    """For each budget, every optimizer's expected best loss over that many of its trials, and the ranking."""
    scores: dict[str, list[float]] = {}
    for row in rows:
        found = [s for s in (ranking_score(t) for t in row.trials) if s is not None]
        if found:
            scores[row.optimizer] = found
    if not scores:
        return ()
    rankings = []
    for size in budgets(min(len(values) for values in scores.values())):
        expected = {name: expected_best(values, size) for name, values in scores.items()}
        rankings.append(BudgetRanking(size, expected, tuple(sorted(expected, key=expected.__getitem__))))
    return tuple(rankings)
