"""The caching-allocator model on hand-built traces. Every expected figure is worked out by hand from the rules of
c10/cuda/CUDACachingAllocator.cpp (the function named in each comment)."""

from __future__ import annotations

import pytest

from optprof.device.alloc_conf import AllocatorConfig
from optprof.device.allocator import (
    LARGE_BUFFER,
    SMALL_BUFFER,
    CachingAllocator,
    OutOfMemory,
    _roundup_power2_next_division,
    allocation_size,
    round_size,
)

MIB, GIB = 1 << 20, 1 << 30


def test_sizes_round_as_the_allocator_rounds_them() -> None:
    assert round_size(1) == 512 and round_size(1000) == 1024 and round_size(1024) == 1024  # round_size
    assert _roundup_power2_next_division(1200, 4) == 1280  # the C++ comment's own example
    assert round_size(1200, divisions=4) == 1536  # but round_size divides only sizes over 512 x divisions
    assert round_size(5000, divisions=4) == 5120  # 4096 + one quarter of 4096
    assert allocation_size(1000) == SMALL_BUFFER  # get_allocation_size: small pool, 2 MiB
    assert allocation_size(3 * MIB) == LARGE_BUFFER  # 1-10 MiB: a 20 MiB segment
    assert allocation_size(11 * MIB + 512) == 12 * MIB  # from 10 MiB: rounded up to 2 MiB


def test_small_requests_share_one_2_mib_segment() -> None:
    alloc = CachingAllocator()
    a, b = alloc.malloc(1000), alloc.malloc(1000)
    assert (a.size, b.size) == (1024, 1024)
    assert b.addr == a.addr + 1024  # split from the same segment (should_split: small pool, >= 512 B left)
    assert (alloc.allocated, alloc.reserved) == (2048, 2 * MIB)


def test_a_large_split_and_its_remainder() -> None:
    alloc = CachingAllocator()
    a = alloc.malloc(3 * MIB)  # a 20 MiB segment, split: 17 MiB remain (> 1 MiB)
    b = alloc.malloc(12 * MIB)  # best fit: the 17 MiB remainder, split again: 5 MiB remain
    assert b.addr == a.addr + 3 * MIB and alloc.reserved == 20 * MIB and alloc.allocated == 15 * MIB
    c = alloc.malloc(6 * MIB)  # the 5 MiB remainder is too small: a second 20 MiB segment
    assert alloc.reserved == 40 * MIB and c.addr not in range(a.addr, a.addr + 20 * MIB)
    d = alloc.malloc(15 * MIB + 512)  # over c's 14 MiB remainder: a 16 MiB segment; 1 MiB - 512 B left is
    assert d.size == 16 * MIB and alloc.reserved == 56 * MIB  # not > 1 MiB, so the block is not split
    for block in (a, b):
        alloc.free(block)  # free_block merges the segment back into one 20 MiB block
    assert [len(run) for run in alloc.segment_blocks() if run[0].addr == a.addr] == [1]
    assert alloc.peak_allocated == 3 * MIB + 12 * MIB + 6 * MIB + 16 * MIB


def test_two_streams_never_share_a_cached_block() -> None:
    alloc = CachingAllocator()
    alloc.free(alloc.malloc(3 * MIB, stream=0))
    alloc.malloc(3 * MIB, stream=1)  # get_free_block looks in the request's stream only
    assert alloc.reserved == 40 * MIB and alloc.allocated == 3 * MIB
    alloc.malloc(3 * MIB, stream=0)  # stream 0 finds its own cached 20 MiB block
    assert alloc.reserved == 40 * MIB


def test_an_oom_that_succeeds_after_freeing_the_cache() -> None:
    alloc = CachingAllocator(capacity=40 * MIB)
    alloc.free(alloc.malloc(15 * MIB))  # a 16 MiB segment, cached
    big = alloc.malloc(30 * MIB)  # 16 + 30 > 40: release_cached_blocks frees the 16 MiB, then the retry fits
    assert (alloc.retries, alloc.reserved, alloc.peak_reserved, big.size) == (1, 30 * MIB, 30 * MIB, 30 * MIB)
    with pytest.raises(OutOfMemory):
        alloc.malloc(12 * MIB)  # 30 + 12 > 40 with nothing cached to free
    assert alloc.ooms == 1


def test_max_split_size_keeps_oversize_blocks_whole() -> None:
    alloc = CachingAllocator(AllocatorConfig.parse("max_split_size_mb:20"))
    alloc.free(alloc.malloc(40 * MIB))  # an oversize (>= 20 MiB) cached block
    alloc.malloc(30 * MIB)  # under 40 + 20: may reuse it whole, never split (should_split)
    assert alloc.reserved == 40 * MIB and alloc.allocated == 40 * MIB
    small = CachingAllocator(AllocatorConfig.parse("max_split_size_mb:20"))
    small.free(small.malloc(40 * MIB))
    small.malloc(12 * MIB)  # a request under max_split_size never takes an oversize block
    assert small.reserved == 52 * MIB


def test_expandable_segments_reuse_pages() -> None:
    plain = CachingAllocator()
    plain.malloc(3 * MIB)
    plain.malloc(25 * MIB)  # the 17 MiB remainder is too small: a 26 MiB segment
    assert plain.reserved == 46 * MIB

    grown = CachingAllocator(AllocatorConfig.parse("expandable_segments:True"), capacity=80 * GIB)
    first = grown.malloc(3 * MIB)  # maps one 20 MiB page of the large pool's segment
    assert grown.reserved == 20 * MIB
    second = grown.malloc(25 * MIB)  # the 17 MiB free tail grows by one more page: 40 MiB mapped, no new segment
    assert grown.reserved == 40 * MIB and second.addr == first.addr + 3 * MIB
    grown.free(first)
    grown.free(second)
    grown.malloc(30 * GIB)  # the two free pages are the start of it: 1,534 pages more, 1,536 in all
    assert grown.reserved == 30 * GIB and len(grown.expandable) == 1


def test_an_expandable_oom_unmaps_free_pages_and_retries() -> None:
    alloc = CachingAllocator(AllocatorConfig.parse("expandable_segments:True"), capacity=60 * MIB)
    for block in (alloc.malloc(3 * MIB), alloc.malloc(25 * MIB)):
        alloc.free(block)  # stream 0's segment: 2 pages mapped, all free
    alloc.malloc(30 * MIB, stream=1)  # its own segment needs 2 pages: 80 > 60, so unmap_block frees stream 0's
    assert (alloc.reserved, alloc.retries, len(alloc.expandable)) == (40 * MIB, 1, 2)


def test_the_option_text_is_the_env_vars() -> None:
    config = AllocatorConfig.parse("expandable_segments:True,max_split_size_mb:128,roundup_power2_divisions:4")
    assert (config.expandable_segments, config.max_split_size, config.roundup_power2_divisions) == \
        (True, 128 * MIB, (4,) * 16)
    for bad in ("expandable_segments:yes", "max_split_size_mb:big", "colour:blue"):
        with pytest.raises(ValueError):
            AllocatorConfig.parse(bad)
