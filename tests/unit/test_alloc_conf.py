"""torch 2.13's allocator configuration: parsed as torch parses it (the shared keys checked against the installed
torch's own parser), and each option's effect on the allocator model, worked out by hand."""

from __future__ import annotations

import pytest
import torch

from optprof.device.alloc_conf import ENVIRONMENT, AllocatorConfig, AllocConfError, environment_text
from optprof.device.allocator import CachingAllocator, OutOfMemory

MIB, GIB = 1 << 20, 1 << 30

# Shared keys (c10/core/AllocatorConfig.cpp, AcceleratorAllocatorConfig::parseArgs): the installed CPU build runs
# this parser itself, so each case is also tried on torch
SHARED_CASES = [
    "", "max_split_size_mb:100", "max_split_size_mb:10", "max_split_size_mb:20", " max_split_size_mb : 1 00 ",
    "max_split_size_mb,100", "max_split_size_mb", "max_split_size_mb:", "max_split_size_mb:abc",
    "max_split_size_mb:25abc", "max_split_size_mb:-1", "max_split_size_mb:99999999999999999999999",
    "max_split_size_mb:100,", "max_split_size_mb:100:garbage_collection_threshold:0.5",
    "large_segment_size_mb:10", "large_segment_size_mb:64,max_split_size_mb:32",
    "large_segment_size_mb:64,max_split_size_mb:64", "max_non_split_rounding_mb:19", "max_non_split_rounding_mb:256",
    "garbage_collection_threshold:0.6", "garbage_collection_threshold:1", "garbage_collection_threshold:0",
    "garbage_collection_threshold:nan", "garbage_collection_threshold:.5x",
    "roundup_power2_divisions:4", "roundup_power2_divisions:3", "roundup_power2_divisions:0",
    "roundup_power2_divisions:[256:1,512:2,>:4]", "roundup_power2_divisions:[64:8,256:4,1024:4,>:1]",
    "roundup_power2_divisions:[3:1]", "roundup_power2_divisions:[256:3]", "roundup_power2_divisions:[256:0,>:4]",
    "roundup_power2_divisions:[256:1", "roundup_power2_divisions:[256:1,", "roundup_power2_divisions:[",
    "roundup_power2_divisions:[256", "roundup_power2_divisions:[256:1]]", "roundup_power2_divisions:[256:1,512]",
    "roundup_power2_divisions:[>:4]", "roundup_power2_divisions:[256:1],large_segment_size_mb:5",
    "expandable_segments:True", "expandable_segments:true", "expandable_segments:[1,2",
    "expandable_segments:True,max_split_size_mb:128", "pinned_use_background_threads:True",
    "pinned_max_round_threshold_mb:64", "pinned_max_cached_size_mb:x",
]
# Keys a CUDA build refuses; a CPU build has no device hook and skips them, so torch is not asked about these
UNKNOWN_KEYS = ["x:1,,", ",", "a=1", "colour:blue", "expandable_segments_handle_type:0"]
# CUDA keys (c10/cuda/CUDAAllocatorConfig.cpp, CUDAAllocatorConfig::parseArgs): None accepted, else the message
CUDA_CASES = {
    "backend:native": None, "backend:cudaMallocAsync": None,
    "backend:async": "Unknown allocator backend, options are native and cudaMallocAsync",
    "release_lock_on_cudamalloc:True": None, "pinned_use_cuda_host_register:False": None,
    "graph_capture_record_stream_reuse:True": None, "pinned_free_catch_all:True": None,
    "throw_on_cudamalloc_oom:True": None, "release_lock_on_cudamalloc:1":
        "Expected 'True' or 'False' at index 2 in ConfigTokenizer but got '1'",
    "pinned_num_register_threads:8": None,
    "pinned_num_register_threads:6": "Number of register threads has to be power of 2, got 6",
    "pinned_num_register_threads:256": "Number of register threads should be less than or equal to 128, got 256",
    "pinned_reserve_segment_size_mb:0": "Pinned reserve segment size has to be greater than 0",
    "per_process_memory_fraction:0.5": None,
    "per_process_memory_fraction:1.5": "per_process_memory_fraction is invalid, set it in [0.0, 1.0]",
}


def _torch_says(text: str) -> str | None:
    """None when torch's shared parser takes `text`, else its message (the last line of its assert text)."""
    torch._C._accelerator_setAllocatorSettings("large_segment_size_mb:20")  # its state outlives a call: reset
    try:
        torch._C._accelerator_setAllocatorSettings(text)
    except (RuntimeError, ValueError, IndexError) as exc:
        return str(exc).splitlines()[0]
    return None


def _ours(text: str) -> str | None:
    try:
        AllocatorConfig.parse(text)
    except AllocConfError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("text", SHARED_CASES)
def test_shared_keys_are_taken_and_refused_as_torch_takes_and_refuses_them(text: str) -> None:
    theirs, ours = _torch_says(text), _ours(text)
    assert (theirs is None) == (ours is None), (theirs, ours)
    if theirs is not None:
        assert ours is not None and theirs.endswith(ours)  # torch's assert prefixes the file and line


def test_unknown_keys_and_cuda_keys_follow_the_cuda_parser() -> None:
    for text in UNKNOWN_KEYS:
        assert (_ours(text) or "").startswith(("Unrecognized key", "Index out of bounds")), text
    assert _ours("colour:blue") == "Unrecognized key 'colour' in Accelerator allocator config."
    for text, message in CUDA_CASES.items():
        assert _ours(text) == message, text


def test_the_divisions_list_fills_its_table_as_torch_does() -> None:
    # parseRoundUpPower2Divisions: the first interval's value also covers every smaller one; '>' every one after
    # the last named; the intervals between named ones stay 0 (no power-of-two rounding there)
    assert AllocatorConfig.parse("roundup_power2_divisions:[256:1,512:2,>:4]").roundup_power2_divisions == \
        (1,) * 9 + (2,) + (4,) * 6
    table = AllocatorConfig.parse("roundup_power2_divisions:[64:8,256:4,1024:4,>:1]").roundup_power2_divisions
    assert table == (8,) * 7 + (0, 4, 0, 4) + (1,) * 5
    config = AllocatorConfig.parse("roundup_power2_divisions:[256:1,512:2,>:4]")
    assert (config.divisions(3 * MIB), config.divisions(600 * MIB), config.divisions(5 * GIB)) == (1, 2, 4)


def test_the_text_parses_back_and_both_variables_are_read_in_torchs_order(monkeypatch: pytest.MonkeyPatch) -> None:
    for text in ("expandable_segments:True,max_split_size_mb:128,roundup_power2_divisions:4",
                 "large_segment_size_mb:64,max_non_split_rounding_mb:128,roundup_power2_divisions:[256:1,>:4]",
                 "garbage_collection_threshold:0.6,per_process_memory_fraction:0.8"):
        config = AllocatorConfig.parse(text)
        assert AllocatorConfig.parse(config.text()) == config
    for name in ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "max_split_size_mb:300")
    assert AllocatorConfig.from_environment().max_split_size == 300 * MIB  # the device-neutral name, 2.13
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "")
    assert environment_text() == "" and AllocatorConfig.from_environment() == AllocatorConfig()  # set wins, empty


def test_expandable_segments_with_max_split_size_no_longer_crash() -> None:
    # The hand trace that raised KeyError in _release_available_cached_blocks: 2.13 steps over expandable blocks
    # there (they are never cudaFree'd), so only release_cached_blocks (unmap) and the retry remain
    alloc = CachingAllocator(AllocatorConfig.parse("expandable_segments:True,max_split_size_mb:20"),
                             capacity=70 * MIB, total_memory=80 * MIB)
    alloc.free(alloc.malloc(60 * MIB))  # 3 pages of 20 MiB mapped, then one free cached block of 60 MiB
    with pytest.raises(OutOfMemory):
        alloc.malloc(80 * MIB)  # 60 + 20 > 70: release_available skips the expandable 60; unmap; 80 > 70 still
    assert (alloc.reserved, alloc.retries) == (0, 1)
    assert len(alloc.malloc(60 * MIB).segment.mapped_pages) == 3  # type: ignore[union-attr]


def test_expandable_address_space_is_nine_eighths_of_the_cards_total() -> None:
    alloc = CachingAllocator(AllocatorConfig.parse("expandable_segments:True"), capacity=70 * GIB,
                             total_memory=80 * GIB)
    alloc.malloc(30 * MIB)
    assert alloc.expandable[0].size == 90 * GIB  # 80 + 80 / 8 GiB in 20 MiB pages, not the usable 70 GiB's


def test_the_memory_fraction_caps_segments_and_garbage_collection_frees_old_ones_first() -> None:
    fraction = "per_process_memory_fraction:0.5"
    capped = CachingAllocator(AllocatorConfig.parse(fraction), capacity=200 * MIB, total_memory=200 * MIB)
    with pytest.raises(OutOfMemory):
        capped.malloc(110 * MIB)  # round(0.5 x 200 MiB) = 100 MiB allowed
    for conf, peak, retries in ((fraction, 92, 0), (fraction + ",garbage_collection_threshold:0.5", 72, 0)):
        alloc = CachingAllocator(AllocatorConfig.parse(conf), capacity=200 * MIB, total_memory=200 * MIB)
        alloc.free(alloc.malloc(20 * MIB))  # a 20 MiB segment, cached after 1 get_free_block call
        alloc.malloc(42 * MIB)  # no cached block fits; gc: 20 reserved <= 50, nothing; a new segment, 62 reserved
        alloc.malloc(30 * MIB)  # gc: 62 > 0.5 x 100 = 50, target 12; the 20 MiB block's age 2 >= the mean 2: freed
        assert (alloc.peak_reserved, alloc.retries) == (peak * MIB, retries), conf


def test_max_non_split_rounding_lets_an_oversize_block_serve_a_smaller_request() -> None:
    for conf, segments in (("max_split_size_mb:20", 2), ("max_split_size_mb:20,max_non_split_rounding_mb:64", 1)):
        alloc = CachingAllocator(AllocatorConfig.parse(conf))
        alloc.free(alloc.malloc(100 * MIB))
        alloc.malloc(50 * MIB)  # get_free_block: the 100 MiB block only if 100 < 50 + max_non_split_rounding
        assert len(alloc.cuda_segments) == segments, conf
