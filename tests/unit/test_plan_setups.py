"""The plan's search space and its memory order (issue 36), without tracing anything."""

from __future__ import annotations

import pytest

from optprof.cli.plan import token_count
from optprof.commands.plan import Setup, _least_memory, setups
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
    assert every[least[(Strategy.FSDP, None)]] == Setup(Strategy.FSDP, None, "full", "chunked:8")
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
