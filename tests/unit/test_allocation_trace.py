"""The allocation trace of a fake step, its replay through the allocator model, and the predicted snapshot that
PyTorch's memory visualiser reads."""

from __future__ import annotations

import contextlib
import functools
import json
import pickle
from collections import Counter
from pathlib import Path

import pytest
from support.cli import run

from optprof.commands.fake_step import FakeTrainer
from optprof.commands.predict import run_predict
from optprof.config import DeviceKind, ModelSelection, PredictConfig, TrainingSettings
from optprof.device.alloc_conf import AllocatorConfig
from optprof.device.replay import replay
from optprof.device.snapshot import snapshot
from optprof.device.trace import AllocationTrace
from optprof.distributed.sharding import fake_process_group, fake_tensors
from optprof.optimizers.registry import resolve_optimizers

TRAINING = TrainingSettings(device=DeviceKind.CUDA, seq_len=128, micro_batch=2)


@functools.cache
def traced(gpus: int = 1) -> tuple[int, AllocationTrace]:
    """(MemTracker's peak, the allocation trace) of one tracked adamw step on the demo model (once per module:
    the tests only read it)."""
    config = PredictConfig(ModelSelection("demo"), ("adamw",), TRAINING, gpus=gpus, alloc_conf="")
    with fake_process_group(gpus) if gpus > 1 else contextlib.nullcontext() as mesh, fake_tensors():
        trainer = FakeTrainer(config, resolve_optimizers(["adamw"])[0], TRAINING, mesh)
        return trainer.peak(2).tensor_peak_bytes, trainer.trace(2)


def live_peak(trace: AllocationTrace, without: str = "") -> int:
    live: dict[int, int] = {}
    current = peak = 0
    for event in trace.events:
        if event.alloc and trace.tags.get(event.id) != without:
            live[event.id] = event.size
            current += event.size
        elif not event.alloc:
            current -= live.pop(event.id, 0)
        peak = max(peak, current)
    return peak


def test_the_trace_holds_what_memtracker_saw_to_the_byte() -> None:
    peak, trace = traced()
    assert live_peak(trace, without="workspace") == peak  # the cuBLAS workspaces are what tensors do not show
    tags = Counter(trace.tags.values())
    assert tags["parameter"] == 39 and tags["state"] == 117 and tags["gradient"] == 39  # adamw: 2 + step each
    assert tags["workspace"] == 2  # forward's and the backward thread's
    assert tags["activation"] > 0 and tags["temporary"] > 0
    assert list(trace.marks) == ["step", "forward", "backward", "optimizer step"]


def test_fsdp_buffers_are_on_their_own_streams() -> None:
    _, trace = traced(gpus=2)
    assert {"default", "all-gather-copy-in", "reduce-scatter"} <= set(trace.streams())
    side = {(e.stream, trace.tags[e.id]) for e in trace.events if e.alloc and e.stream != "default"}
    # the all-gather buffers; the reduce-scatter outputs, which become the sharded gradients (FSDP2 keeps them)
    assert side == {("all-gather-copy-in", "communication"), ("reduce-scatter", "gradient")}


def test_the_replay_rounds_and_caches_as_the_allocator_does() -> None:
    _, trace = traced()
    plain = replay(trace)
    assert plain.peak_allocated >= live_peak(trace) and plain.peak_reserved >= plain.peak_allocated
    assert plain.cached_free_at_reserved_peak == plain.peak_reserved - plain.allocator.allocated_at_peak_reserved >= 0
    assert plain.oom is None
    tight = replay(trace, capacity=plain.peak_allocated // 2)
    assert tight.oom is not None and tight.oom.startswith("step 1")
    grown = replay(trace, AllocatorConfig(expandable_segments=True))
    assert grown.peak_allocated == plain.peak_allocated  # the same blocks, packed into pages
    assert grown.peak_reserved <= plain.peak_reserved


def test_the_predicted_snapshot_is_what_memory_viz_reads(tmp_path: Path) -> None:
    from torch.cuda import _memory_viz

    _, trace = traced()
    result = replay(trace, record=True)
    data = snapshot(result.allocator)
    assert sum(s["total_size"] for s in data["segments"]) == result.allocator.reserved
    summary = _memory_viz.segsum(data)  # reads every segment and block
    assert "segment" in summary.lower()
    assert "alloc" in _memory_viz.trace(data)  # reads every trace entry
    for page in (_memory_viz.trace_plot(data), _memory_viz.segment_plot(data)):
        assert "snapshot.pickle" in page and "add_local_files" in page


def test_predict_writes_the_snapshot_and_reports_reserved(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "step.pickle"
    code, out, err = run(["predict", "demo", "-o", "adamw", "--seq-len", "128", "--micro-batch", "2",
                          "--alloc-conf", "expandable_segments:True", "--memory-snapshot", str(target), "-f", "json"],
                         capsys)
    assert code == 0, err
    row = json.loads(out)["results"][0]
    assert row["predicted_reserved_bytes"] >= row["predicted_allocated_bytes"] >= row["predicted_peak_bytes"]
    data = pickle.loads(target.read_bytes())
    assert data["allocator_settings"]["PYTORCH_CUDA_ALLOC_CONF"].startswith("expandable_segments:True")
    assert all(segment["is_expandable"] for segment in data["segments"])


@pytest.mark.parametrize("args", [
    ["predict", "demo", "--alloc-conf", "expandable_segments:maybe"],
    ["predict", "demo", "--device", "cpu", "--alloc-conf", "expandable_segments:True"],
])
def test_bad_allocator_options_exit_2(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(args, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err


def test_the_largest_micro_batch_is_judged_on_the_simulated_oom() -> None:
    config = PredictConfig(ModelSelection("demo"), ("sgd",), TRAINING, gpu_memory_bytes=2 << 30,
                           reserve_bytes=512 << 20, alloc_conf="")
    row = run_predict(config).results[0]
    assert row.predicted_max_micro_batch and row.predicted_peak_at_max_bytes
    assert row.predicted_peak_at_max_bytes <= (2 << 30) - (512 << 20)  # the reserved bytes at the largest size
