"""The pieces of predict's shared step (issue 28): forking at a point (processes/branching), the state spliced
into an allocation trace where its own step has it, a trace extrapolated to another micro-batch. The levers
against the methods they replace, over every optimizer: tests/integration/test_shared_step.py."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from optprof.commands import predict
from optprof.commands.fake_step import FakeTrainer, SharedTrainer, SharedView, StepFailed, Traced
from optprof.config import DeviceKind, ModelSelection, PredictConfig, TrainingSettings
from optprof.device.trace import AllocationTrace, TraceEvent, extrapolated
from optprof.optimizers.registry import REGISTRY
from optprof.processes.branching import run_branched

CUDA_BF16 = TrainingSettings(device=DeviceKind.CUDA, seq_len=16, amp="bf16")


def test_the_shared_trace_of_each_optimizer_is_its_own_trace(model_dir: Callable[[str], str]) -> None:
    """The allocation traces themselves, event by event, with the state spliced in where its own step has it."""
    names = ["adamw", "adam-mini"]
    config = PredictConfig(ModelSelection(model_dir("tiny-gpt2")), tuple(names), CUDA_BF16, alloc_conf="", gpus=2)
    with predict.fake_run(config, CUDA_BF16) as (mesh, _):
        trainer = SharedTrainer(config, [REGISTRY[n] for n in names], CUDA_BF16, mesh, 2,
                                lambda entry, exc: StepFailed("failed", repr(exc)))
        trainer.trace_all({1: [0, 1], 2: [0]})
        views = [SharedView(trainer, index) for index in range(len(names))]
    for name, view in zip(names, views, strict=True):
        with predict.fake_run(config, CUDA_BF16) as (mesh, _):
            own = FakeTrainer(config, REGISTRY[name], CUDA_BF16, mesh)
            for micro_batch in (1, 2) if name != "adam-mini" else (1,):
                assert view.trace(micro_batch) == own.trace(micro_batch), (name, micro_batch)
                assert view.peak(micro_batch) == own.peak(micro_batch), (name, micro_batch)


def _allocation_pairs(trace: AllocationTrace) -> list[tuple[bool, int, str | None]]:
    allocated = {e.id: e.size for e in trace.events if e.alloc}
    return sorted((e.alloc, e.size if e.alloc else allocated[e.id], trace.tags.get(e.id)) for e in trace.events)


def test_a_step_recorded_without_memtracker_keeps_the_tracked_steps_trace(model_dir: Callable[[str], str]) -> None:
    """The plan's shallow copies are recorded without MemTracker (`tensor_peak=False`), under FSDP2. The recorder
    lets DTensor desugar into each rank's local ops, as MemTracker does (without that, AdamW's foreach ops were
    recorded on the unsharded DTensors: twice the bytes, no storages). What differs, and is known: one free at the
    end of forward moves across the root's forward hook (MemTracker's module hooks run after FSDP2's), and Adam-mini's
    per-block `torch.sum(grad * grad)` on DTensor gradients leaves 4-byte results the tracked recording misses."""
    names = ["adamw", "adam-mini"]
    config = PredictConfig(ModelSelection(model_dir("tiny-gpt2")), tuple(names), CUDA_BF16, alloc_conf="", gpus=2,
                           gpu="h100-sxm")
    traces = []
    for tensor_peak in (True, False):
        with predict.fake_run(config, CUDA_BF16) as (mesh, _):
            trainer = SharedTrainer(config, [REGISTRY[n] for n in names], CUDA_BF16, mesh, 2,
                                    lambda entry, exc: StepFailed("failed", repr(exc)), tensor_peak=tensor_peak)
            trainer.trace_all({2: [0, 1]})
            found = [trainer.outcome(2, index) for index in (0, 1)]
        assert all(isinstance(outcome, Traced) and (outcome.peak is None) != tensor_peak for outcome in found)
        traces.append([outcome.trace for outcome in found if isinstance(outcome, Traced)])
    (adamw, adam_mini), (adamw_recorded, adam_mini_recorded) = traces
    assert adamw is not None and adamw_recorded is not None
    assert adamw_recorded.ops == adamw.ops and _allocation_pairs(adamw_recorded) == _allocation_pairs(adamw)
    assert all(abs(adamw_recorded.marks[phase] - at) <= 1 for phase, at in adamw.marks.items())
    assert adam_mini is not None and adam_mini_recorded is not None
    extra = list((Counter(_allocation_pairs(adam_mini_recorded)) - Counter(_allocation_pairs(adam_mini))).elements())
    assert not Counter(_allocation_pairs(adam_mini)) - Counter(_allocation_pairs(adam_mini_recorded))
    assert extra and {size for _, size, _ in extra} == {4}


def test_branches_each_go_on_from_the_fork_and_report_back() -> None:
    trail: list[str] = ["before"]

    def compute(brancher: Any) -> tuple[int, list[str]]:
        branch = brancher.fork()
        trail.append(f"branch {branch}")  # each child's own copy
        if branch == 1:
            raise ValueError("branch 1 fails")
        if branch == 2:
            os._exit(3)  # dies without a word
        return branch * 10, list(trail)

    found = run_branched(compute, 4, 2, lambda branch, exc: (-1, [str(exc)]))
    assert found[0] == (0, ["before", "branch 0"]) and found[3] == (30, ["before", "branch 3"])
    assert found[1] == (-1, ["branch 1 fails"])
    assert 2 not in found  # died
    assert trail == ["before"]  # the parent stopped at the branching point


def test_an_error_before_the_branching_point_is_the_parents() -> None:
    def compute(brancher: Any) -> int:
        raise KeyError("no fork yet")

    with pytest.raises(KeyError):
        run_branched(compute, 2, 2, lambda branch, exc: 0)


def _trace(sizes: list[int]) -> AllocationTrace:
    events = [TraceEvent(True, 0, 100, "default"), TraceEvent(True, 1, sizes[0], "default"),
              TraceEvent(True, 2, sizes[1], "reduce-scatter"), TraceEvent(False, 1, 0, "")]
    return AllocationTrace(events, {0: "parameter", 1: "activation", 2: "communication"}, {"step": 1})


def test_a_trace_extrapolates_each_size_on_its_line() -> None:
    two, three = _trace([20, 8]), _trace([30, 8])
    five = extrapolated(two, three, 2, 5)
    assert five is not None and [e.size for e in five.events] == [100, 50, 8, 0]
    assert extrapolated(two, three, 2, 1) == _trace([10, 8])
    assert extrapolated(_trace([20, 8]), _trace([10, 8]), 2, 5) is None  # a size below zero: no line
    fewer = AllocationTrace(three.events[:-1], three.tags, three.marks)
    assert extrapolated(two, fewer, 2, 5) is None  # not the same allocations: no line
