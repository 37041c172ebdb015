"""The plan's search space and its memory order (issue 36), without tracing anything."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from optprof.cli.plan import token_count
from optprof.commands.plan import Setup, _largest, _least_memory, setups
from optprof.config import Strategy
from optprof.errors import UsageError


def test_eight_gpus_search_24_setups_per_optimizer() -> None:
    found = setups(8)
    assert len(found) == 24
    assert {(s.strategy, s.shard_size) for s in found} == {(Strategy.FSDP, None), (Strategy.HSDP, 4),
                                                           (Strategy.ZERO2, None)}
    assert {(s.strategy, s.shard_size) for s in setups(16)} >= {(Strategy.HSDP, 8)}  # a node's 8, across nodes
    assert len(setups(1)) == 8 and all(s.strategy == Strategy.FSDP for s in setups(1))
    with pytest.raises(UsageError, match="plan searches"):
        setups(8, strategies=("ddp",))


def test_the_least_memory_setup_bounds_its_strategy_only_where_it_holds_least() -> None:
    every = setups(2, strategies=("fsdp",))
    least = _least_memory(every)
    # per loss: the chunked loss is not less by construction (an A800 zero2 step reserved more with it)
    assert {key: every[index] for key, index in least.items()} == {
        (Strategy.FSDP, None, loss): Setup(Strategy.FSDP, None, "full", loss) for loss in ("default", "chunked:8")}
    # two selective modes: neither holds less than the other by construction, so no bound
    neither = [Setup(Strategy.FSDP, None, "selective-op", "default"),
               Setup(Strategy.FSDP, None, "selective-layer:2", "default")]
    assert _least_memory(neither) == {}


@pytest.mark.parametrize(("text", "tokens"), [("4M", 4_000_000), ("4Mi", 4 * 2**20), ("512k", 512_000),
                                              ("4194304", 4194304)])
def test_token_counts(text: str, tokens: int) -> None:
    assert token_count(text) == tokens


def test_a_bad_token_count_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="token count"):
        token_count("4 tokens")


class _Line:
    """A step whose allocated peak grows by `per` a micro-batch from `base`, and that fits up to `fits_to` (the
    cache's fragmentation keeps it below where its allocations alone reach the card)."""

    def __init__(self, base: int, per: int, usable: int, fits_to: int, hole: int | None = None) -> None:
        self.base, self.per, self.usable, self.fits_to, self.hole = base, per, usable, fits_to, hole
        self.probes: list[int] = []

    def fits(self, micro_batch: int) -> bool:
        self.probes.append(micro_batch)
        return micro_batch <= self.fits_to and micro_batch != self.hole

    def on_card(self, micro_batch: int) -> SimpleNamespace:
        return SimpleNamespace(peak_allocated=self.base + self.per * micro_batch)


@pytest.mark.parametrize("fits_to", [0, 1, 2, 3, 4, 9, 17, 18, 21, 22, 40, 256])
@pytest.mark.parametrize("per", [0, 1, 3])
def test_the_largest_micro_batch_is_the_largest_that_fits(fits_to: int, per: int) -> None:
    # the bound from the allocated line sits at 21 where per is 1: below it, on it and past it (not a bound)
    line = _Line(base=10, per=per, usable=31, fits_to=fits_to)
    expected = 0 if fits_to < 2 else min(fits_to, 256)
    assert _largest(line, 256) == expected  # type: ignore[arg-type]
    assert len(line.probes) <= 2 + 2 * 8 + 1  # galloping and bisecting: about two log2(cap) at most


def test_a_size_that_fits_above_one_that_does_not_is_found() -> None:
    # the cache's fragmentation: llama-3.1-8b under hsdp with full checkpointing fits Adam-mini at 8 and 10, not 9
    line = _Line(base=10, per=1, usable=31, fits_to=19, hole=18)  # bound 21
    assert _largest(line, 256) == 19  # type: ignore[arg-type]
