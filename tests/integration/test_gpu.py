"""The CUDA path for real. Marked `gpu`: skipped where CUDA is absent (conftest.py)."""

from __future__ import annotations

import pytest

from optprof.commands.compare import run_compare
from optprof.commands.state_size import run_state_size
from optprof.config import CompareConfig, ModelSelection, StateSizeConfig, TrainingSettings

pytestmark = pytest.mark.gpu


def test_compare_on_cuda_measures_every_source() -> None:
    settings = TrainingSettings(device="cuda", seq_len=256, steps=3)
    report = run_compare(CompareConfig(ModelSelection("demo"), ("adamw", "sgd"), settings))  # isolated
    state_size = run_state_size(StateSizeConfig(ModelSelection("demo"), ("adamw", "sgd"), jobs=1))
    on_meta = {row.optimizer: row.state_bytes for row in state_size.results}
    assert report.device["type"] == "cuda" and report.device["name"]
    for row in report.results:
        assert row.status == "ok", row.reason
        assert row.state_bytes == on_meta[row.optimizer]
        assert row.peak_source == "torch_max_reserved"
        assert row.torch_max_reserved_bytes >= row.torch_max_allocated_bytes > 0
        # the allocator's peak over the timed steps holds parameters, gradients and state at the step
        assert row.torch_max_allocated_bytes >= row.param_bytes + row.grad_bytes + row.state_bytes
        assert row.tensor_peak_bytes > 0 and row.tokens_per_s > 0
        if "nvml_matched_by" in report.device:  # NVML present: the card's memory includes ours
            assert row.nvml_device_peak_bytes >= row.torch_max_reserved_bytes


def test_micro_batch_search_on_cuda_under_a_memory_limit() -> None:
    from optprof.config import SearchSettings

    settings = TrainingSettings(device="cuda", seq_len=512, steps=2, memory_limit_bytes=2 * 2**30)
    search = SearchSettings(max_micro_batch=512)
    report = run_compare(CompareConfig(ModelSelection("demo"), ("sgd", "adamw"), settings, search=search))
    best = {row.optimizer: row for row in report.results}
    assert best["sgd"].max_micro_batch >= best["adamw"].max_micro_batch >= 1
    for row in report.results:
        fitting = [p for p in row.search if p.fits]
        assert all(p.peak_bytes <= 2 * 2**30 for p in fitting)  # reserved, under the allocator's cap


def test_offloaded_optimizer_state_leaves_the_device() -> None:
    """--offload-optimizer (FSDP2's CPUOffloadPolicy) over 2 CUDA ranks: the same state per rank, on the host,
    so the allocator's device peak drops by at least AdamW's state and the host's RSS holds it."""
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")
    settings = TrainingSettings(device="cuda", seq_len=256, steps=2)
    runs = {offload: run_compare(CompareConfig(ModelSelection("demo"), ("adamw",), settings, gpus=2,
                                               offload_optimizer=offload)).results[0] for offload in (False, True)}
    kept, offloaded = runs[False], runs[True]
    assert kept.status == offloaded.status == "ok", (kept.reason, offloaded.reason)
    assert offloaded.state_bytes == kept.state_bytes
    assert offloaded.torch_max_allocated_bytes <= kept.torch_max_allocated_bytes - kept.state_bytes
    assert offloaded.rss_peak_bytes >= kept.rss_peak_bytes + kept.state_bytes // 2


def test_memory_snapshot_per_optimizer(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import pickle

    settings = TrainingSettings(device="cuda", seq_len=128, steps=2)
    report = run_compare(CompareConfig(ModelSelection("demo"), ("adamw", "sgd"), settings,
                                       memory_snapshot_dir=str(tmp_path)))
    for row in report.results:
        assert row.status == "ok", row.reason
        path = tmp_path / f"{row.optimizer}.pickle"
        assert any(str(path) in note for note in row.notes)
        with path.open("rb") as file:
            assert "segments" in pickle.load(file)  # the allocator snapshot format


def test_a_real_allocator_trace_replayed_through_the_model_gives_the_same_segments() -> None:
    """torch's own allocator records a small training step; its alloc/free trace, replayed through optprof's model
    (under this process's PYTORCH_CUDA_ALLOC_CONF) from an empty cache, must grow the cache the same way in the same
    order: the same cudaMalloc'd segments, or with expandable_segments:True the same page mappings (segment_map:
    no segment_alloc happens then, which the first GPU run of this test found)."""
    import torch

    from optprof.device.alloc_conf import AllocatorConfig
    from optprof.device.allocator import CachingAllocator
    from optprof.model.loading import load_model

    torch.cuda.empty_cache()
    torch.cuda.memory._record_memory_history(max_entries=1_000_000)
    try:
        torch.cuda.reset_peak_memory_stats()
        model = load_model("demo", device="cuda").module
        optimizer = torch.optim.AdamW(model.parameters())
        for _ in range(2):
            tokens = torch.randint(0, 1000, (4, 128), device="cuda")
            model(input_ids=tokens, labels=tokens, use_cache=False).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        real = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    streams: dict[int, int] = {}
    model_allocator = CachingAllocator(AllocatorConfig.from_environment(), record=True)
    live = {}
    for event in real["device_traces"][torch.cuda.current_device()]:
        stream = streams.setdefault(event["stream"], len(streams))
        if event["action"] == "alloc":
            live[event["addr"]] = model_allocator.malloc(event["size"], stream)
        elif event["action"] == "free_completed" and event["addr"] in live:
            model_allocator.free(live.pop(event["addr"]))
    trace = real["device_traces"][torch.cuda.current_device()]
    growth = ("segment_alloc", "segment_map")
    real_growth = [(e["action"], e["size"]) for e in trace if e["action"] in growth]
    assert real_growth  # the step grew the cache
    assert [(e.action, e.size) for e in model_allocator.events or () if e.action in growth] == real_growth
