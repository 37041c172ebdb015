"""Trackers: context managers around training steps, each leaving a frozen result in `.result` on exit.

- `TensorPeakTracker`: torch's MemTracker (FSDPMemTracker when sharded) over one step: the peak of live
  tensor bytes, by category. Works on fake tensors too, which is how `predict` predicts.
- `AllocatorPeakTracker`: the CUDA caching allocator's peaks over the steps (None on a CPU).
- `EnergyMeter`: the card's NVML energy counter, read at both ends.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from optprof.device.trace import AllocationTrace, TraceRecorder
from optprof.measure.device import AllocatorStats, Device
from optprof.measure.nvml import NvmlReader
from optprof.measure.sampler import SamplerResult
from optprof.measure.step import TrainStep
from optprof.optimizers.state import state_tensors
from optprof.results.vocab import PeakSource

# MemTracker's and FSDPMemTracker's category names, folded into the breakdown's
TRACKER_PARAMETERS = ("PARAM", "BUFFER", "SHARDED_PARAM", "UNSHARDED_PARAM")
TRACKER_GRADIENTS = ("GRAD", "SHARDED_GRAD", "UNSHARDED_GRAD")


@dataclass(frozen=True)
class TrackedPeak:
    tensor_peak_bytes: int
    breakdown: dict[str, int]
    grad_bytes: int | None
    fwd_bwd_peak_bytes: int  # the peak up to the end of backward


def tracker_breakdown(snapshot: dict[Any, int], state_bytes: int) -> dict[str, int]:
    """MemTracker's categories at the peak, folded into parameters, gradients, state, activations, temporaries.

    MemTracker files everything created inside optimizer.step() as optimizer memory, and tensors we registered
    ourselves (inputs, optimizer helpers outside `optimizer.state`) as other. All of the state is alive at the
    peak (it persists between steps), so the state is `state_bytes` and the rest of those two is temporary.
    """
    by_name = {getattr(k, "name", str(k)): v for k, v in snapshot.items()}

    def total(names: tuple[str, ...]) -> int:
        return sum(by_name.get(name, 0) for name in names)

    state = min(state_bytes, total(("OPT", "OTH")))
    parameters = total(TRACKER_PARAMETERS)
    gradients = total(TRACKER_GRADIENTS)
    activations = total(("ACT",))
    return {
        "parameters": parameters,
        "gradients": gradients,
        "optimizer_state": state,
        "activations": activations,
        # backward temporaries, FSDP's all-gather and reduce-scatter buffers, inputs, step temporaries
        "temporaries": sum(by_name.values()) - parameters - gradients - state - activations,
    }


# what a trace tags that MemTracker never sees: cuBLAS's workspace and the flash backward's scratch (device/trace.py)
UNTRACKED_TAGS = ("workspace", "attention workspace")
TAG_CATEGORIES = {"parameter": "parameters", "buffer": "parameters", "gradient": "gradients",
                  "state": "optimizer_state", "activation": "activations"}  # the rest are temporaries


def trace_peak(trace: AllocationTrace) -> TrackedPeak:
    """MemTracker's peak, read from a step's allocation trace: the live bytes of every allocation MemTracker tracks
    (all but `UNTRACKED_TAGS`) at their first maximum, by the allocations' tags. The peak equals MemTracker's to
    the byte (tests/integration/test_periodic_predict.py, across the families); so are parameters, gradients and
    state. Activations are what a forward left for backward (the trace's tag): MemTracker's are all that a forward
    allocated, so where the peak falls inside a forward (mamba's scan) what that forward frees before its end, and
    the loss, are temporaries here and activations there. How a step traced only as copies of its first layers
    (`commands/shallow_step.py`) gets its peak."""
    sizes: dict[int, int] = {}
    live = peak = fwd_bwd_peak = 0
    at_peak: dict[int, int] = {}
    optimizer_from = trace.marks.get("optimizer step", len(trace.events))
    for index, event in enumerate(trace.events):
        if event.alloc:
            if trace.tags.get(event.id) in UNTRACKED_TAGS:
                continue
            sizes[event.id] = event.size
            live += event.size
            if live > peak:
                peak, at_peak = live, dict(sizes)
            if index < optimizer_from:
                fwd_bwd_peak = max(fwd_bwd_peak, live)
        else:
            live -= sizes.pop(event.id, 0)
    breakdown = dict.fromkeys(("parameters", "gradients", "optimizer_state", "activations", "temporaries"), 0)
    for allocation, size in at_peak.items():
        breakdown[TAG_CATEGORIES.get(trace.tags.get(allocation, ""), "temporaries")] += size
    return TrackedPeak(peak, breakdown, None, fwd_bwd_peak)


def traced_state_bytes(trace: AllocationTrace) -> int:
    """The optimizer state's bytes: the allocations a trace tags as state (alive throughout a step)."""
    return sum(event.size for event in trace.events if event.alloc and trace.tags.get(event.id) == "state")


class _NoHook:
    """Stands for a gradient hook never registered: a frozen parameter (LoRA's base, --freeze) takes none, nor a
    module's inputs outside the autograd graph (`_module_grad_hooks`)."""

    def remove(self) -> None:
        pass


def peak_tracker(base: type, *args: Any) -> Any:
    """torch's MemTracker (or FSDPMemTracker, `base`) with two changes:

    - without its per-module peak snapshots, which optprof does not use and which cost a pass over every module
      at every op (about 20 s for one Llama-2-7B step on fake tensors); where this torch lacks the method
      replaced, they stay;
    - frozen parameters get no gradient hooks: torch's tracker registers one on every parameter of a module,
      which raises for a parameter that does not require grad.
    """

    class Tracker(base):
        def _track_module_params_and_buffers(self, module: Any, install_grad_hooks: bool = True) -> Any:
            if install_grad_hooks:
                for param in module.parameters():
                    if not param.requires_grad and self._param_to_grad_hook_handles.get(param) is None:
                        self._param_to_grad_hook_handles[param] = (_NoHook(), _NoHook())
            return super()._track_module_params_and_buffers(module, install_grad_hooks)

        if hasattr(base, "_update_peak_stats"):
            def _update_peak_stats(self, peak_state: Any) -> None:
                for dev, snap in self._curr_mem_snap.items():
                    if self._peak_mem.get(dev, 0) < snap["Total"]:
                        self._peak_mem[dev] = snap["Total"]
                        self._peak_mem_snap[dev] = dict(snap)

    return Tracker(*args)


def _memory_tracker(step: TrainStep, with_optimizer: bool = True) -> Any:
    """FSDPMemTracker for a sharded model (FSDP's own categories and buffers), else a MemTracker. Without the
    optimizer, its state is not tracked until `TensorPeakTracker.join` registers it."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.distributed.fsdp import FSDPModule

    optimizer = step.optimizer if with_optimizer else None
    if isinstance(step.model, FSDPModule):
        tracker = peak_tracker(FSDPMemTracker, step.model, optimizer)
        tracker.track_inputs(tuple(step.batches))
        return tracker
    tracker = peak_tracker(MemTracker)
    tracker.track_external(*step.batches)
    tracker.track_external(step.model)
    if optimizer is not None:
        _register_state(tracker, optimizer, step.params)
    return tracker


def _register_state(tracker: Any, optimizer: Any, params: list[Any]) -> None:
    """The optimizer's state, for MemTracker from the start (`_memory_tracker`) or for any tracker that started
    without it (`TensorPeakTracker.join`). FSDPMemTracker registers it itself when given the optimizer."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    if isinstance(tracker, FSDPMemTracker):
        tracker._optm = optimizer
        tracker._instrument_optimizer()  # its state, and the step hooks that file the step's tensors under it
        return
    # Registered as "other" first (state_tensors holds no parameter or gradient storage); registering the
    # optimizer afterwards re-labels its own state.
    tracker.track_external(*state_tensors(optimizer, params))
    tracker.track_external(optimizer)


class TensorPeakTracker:
    """`with TensorPeakTracker(step, state_bytes): step.run()` -> `.result`, a TrackedPeak. Tracking slows the
    step, so a tracked step is never a timed one."""

    def __init__(self, step: TrainStep, state_bytes: int, with_optimizer: bool = True) -> None:
        self.step = step
        self.state_bytes = state_bytes
        self.tracker = _memory_tracker(step, with_optimizer)
        self._fwd_bwd: list[int] = []
        self._grad_hooks: list[Any] = []  # ModTracker's, this step's (`_module_grad_hooks`)
        self._hooks_kept = contextlib.ExitStack()
        self.result: TrackedPeak | None = None

    def _peak_snapshot(self) -> dict[Any, int]:
        placement = self._placement()
        peaks = [snap for dev, snap in self.tracker.get_tracker_snapshot("peak").items() if dev.type == placement.type]
        if not peaks:
            raise RuntimeError("MemTracker saw no tensors on the trial's device")
        return peaks[0]

    def __enter__(self) -> TensorPeakTracker:
        step = self.step
        step.before_forward = self.tracker.reset_mod_stats  # MemTracker refuses a second root forward otherwise
        step.after_backward = self._after_backward
        step.measure_grads = True
        self._hooks_kept.enter_context(_module_grad_hooks(self._grad_hooks))
        self.tracker.__enter__()
        return self

    def _after_backward(self) -> None:
        self._fwd_bwd.append(int(self._peak_snapshot().get("Total", 0)))
        for handle in self._grad_hooks:  # backward is done: what they held of its graph goes, as in a step untracked
            handle.remove()
        self._grad_hooks.clear()

    def join(self, optimizer: Any, state_bytes: int) -> None:
        """Track `optimizer` from here on as if it had been tracked from the start (its state is alive throughout a
        step, unchanged before its own step): its state is registered, and what that added to each category now
        is added to the peaks so far. Makes a tracker that ran forward and backward without any optimizer (one
        for all of them) that optimizer's own, to the byte."""
        tracker = self.tracker
        before = {device: dict(snap) for device, snap in tracker._curr_mem_snap.items()}
        _register_state(tracker, optimizer, self.step.params)
        self.step.optimizer = optimizer
        self.state_bytes = state_bytes
        for device, snap in tracker._curr_mem_snap.items():
            added = {key: value - before.get(device, {}).get(key, 0) for key, value in snap.items()}
            peak = tracker._peak_mem_snap.setdefault(device, dict.fromkeys(snap, 0))
            for key, value in added.items():
                peak[key] = peak.get(key, 0) + value
            tracker._peak_mem[device] = tracker._peak_mem.get(device, 0) + added.get("Total", 0)
            if device.type == self._placement().type:
                self._fwd_bwd = [total + added.get("Total", 0) for total in self._fwd_bwd]

    def _placement(self) -> Any:
        import torch

        return torch.device(self.step.device.torch_device)

    def __exit__(self, *exc: Any) -> None:
        step = self.step
        try:
            self.tracker.__exit__(*exc)
        finally:
            self._hooks_kept.close()
            step.before_forward = step.after_backward = None
            step.measure_grads = False
        if exc[0] is not None:
            return
        snapshot = self._peak_snapshot()
        categories = {k: int(v) for k, v in snapshot.items() if k != "Total"}
        self.result = TrackedPeak(int(snapshot.get("Total", 0)), tracker_breakdown(categories, self.state_bytes),
                                  step.grad_bytes, self._fwd_bwd[0])


@contextlib.contextmanager
def _module_grad_hooks(handles: list[Any]) -> Iterator[None]:
    """Collect in `handles` the gradient hooks MemTracker's ModTracker registers on each module's inputs and outputs
    in forward (torch/distributed/_tools/mod_tracker.py, `_fw_pre_hook` and `_fw_post_hook`), for removal after
    backward. The hook on a module's inputs holds their autograd nodes in its closure (torch/autograd/graph.py,
    `register_multi_grad_hook`, mode "all": `grad_fns`), and the node holds the hook: a cycle through C++ that
    Python's collector does not break, so the step's graph outlived backward, and with it what a custom op kept on
    its context rather than saving it for backward (transformers' grouped_mm fallback keeps `offs`, 16 B per MoE
    layer), which the real step frees (issue 37: MoE predictions were 16-32 B high)."""
    import torch.distributed._tools.mod_tracker as mod_tracker

    original = mod_tracker.register_multi_grad_hook

    def register(tensors: Any, *args: Any, **kwargs: Any) -> Any:
        # an input that requires grad but has no autograd node: a leaf made where grad is off, as inside a custom
        # Function's forward (reformer's reversible layers run their blocks there); ModTracker's own helper asserts
        # on it (torch/autograd/graph.py, `_get_grad_fn_or_grad_acc`). Such a module is not in the graph: its
        # backward entry goes unmarked, which moves only MemTracker's attribution by module, not the peak
        tensors = [t for t in tensors if _has_node(t)]
        if not tensors:
            return _NoHook()
        handle = original(tensors, *args, **kwargs)
        handles.append(handle)
        return handle

    mod_tracker.register_multi_grad_hook = register
    try:
        yield
    finally:
        mod_tracker.register_multi_grad_hook = original


def _has_node(tensor: Any) -> bool:
    from torch.autograd.graph import _get_grad_fn_or_grad_acc

    try:
        _get_grad_fn_or_grad_acc(tensor)
    except AssertionError:
        return False
    return True


def tracked_step(step: TrainStep, state_bytes: int, recorder: TraceRecorder | None = None,
                 join: Callable[[TensorPeakTracker], None] | None = None) -> TrackedPeak:
    """One untimed step under MemTracker: the peak of live tensor bytes and what they were; with `recorder`, also
    the step's allocation trace (device/trace.py), from the same run. With `join`, the step's forward and backward
    run without the optimizer, tracked or recorded, and `join(tracker)` is called after backward (after the
    trackers' own marks), where it may fork and join each optimizer (`TensorPeakTracker.join`)."""
    with contextlib.ExitStack() as stack:
        if recorder is not None:
            stack.enter_context(_recorded(step, recorder, with_state=join is None))
        tracked = stack.enter_context(TensorPeakTracker(step, state_bytes, with_optimizer=join is None))
        if recorder is not None:
            _mark_phases(step, recorder)
        if join is not None:
            _then(step, lambda: join(tracked))
        step.run()
    assert tracked.result is not None
    return tracked.result


def recorded_step(step: TrainStep, recorder: TraceRecorder, join: Callable[[], None] | None = None) -> None:
    """One untimed step under the allocation recorder alone: `tracked_step`'s trace without MemTracker, whose
    dispatch mode and module hooks cost about a quarter of a fake step; for a caller that reads only the trace (a
    plan's shallow copies). With `join`, as `tracked_step`'s, called after backward (nothing to register)."""
    with _recorded(step, recorder, with_state=join is None):
        _mark_phases(step, recorder)
        if join is not None:
            _then(step, join)
        try:
            step.run()
        finally:
            step.after_backward = None


def _then(step: TrainStep, action: Callable[[], None]) -> None:
    """`action` after whatever the step already does after backward."""
    before = step.after_backward

    def after_backward() -> None:
        if before is not None:
            before()
        action()

    step.after_backward = after_backward


@contextlib.contextmanager
def _recorded(step: TrainStep, recorder: TraceRecorder, with_state: bool = True) -> Iterator[None]:
    """The allocations alive before the step first (parameters, buffers, state), then the step's, with its phases.
    Without the state, the place it would take is kept for `TraceRecorder.join_state`."""
    recorder.tag_tensors(step.model.parameters(), "parameter")
    recorder.tag_tensors(step.model.buffers(), "buffer")
    recorder.keep_state_place()
    if with_state:
        recorder.tag_tensors(state_tensors(step.optimizer, step.params), "state")
    recorder.tag_tensors(step.batches, "input")
    recorder.name_streams(step.model)
    recorder.mark("step")

    def before(*args: Any) -> None:
        recorder.start_forward()
        recorder.mark("forward")

    def after(*args: Any) -> None:
        recorder.end_forward()
        recorder.mark("backward")

    hooks = [step.model.register_forward_pre_hook(before), step.model.register_forward_hook(after)]
    try:
        with recorder.recording():
            yield
    finally:
        for hook in hooks:
            hook.remove()


def _mark_phases(step: TrainStep, recorder: TraceRecorder) -> None:
    """After backward: the gradients are named, and the optimizer step begins."""
    def gradients_named() -> None:
        recorder.name_kept([p.grad for p in step.params], step.loss)
        recorder.mark("optimizer step")

    _then(step, gradients_named)


@dataclass(frozen=True)
class AllocatorPeak:
    stats: AllocatorStats
    allocated_after_first_backward: int | None  # the allocator's peak through the first tracked backward

    @property
    def fwd_bwd_peak_bytes(self) -> int | None:
        """The forward+backward peak, DERIVED in reserved terms: the allocated peak through the first backward
        plus what the allocator held beyond live tensors over all the steps."""
        if self.allocated_after_first_backward is None:
            return None
        return self.allocated_after_first_backward + self.stats.max_reserved_bytes - self.stats.max_allocated_bytes


class AllocatorPeakTracker:
    """The caching allocator's peaks over the steps run inside (`.result` None where there is no allocator)."""

    def __init__(self, device: Device, step: TrainStep) -> None:
        self.device = device
        self.step = step
        self._after_backward: list[int] = []
        self.result: AllocatorPeak | None = None

    def _note_backward(self) -> None:
        stats = self.device.allocator_stats()
        if stats is not None:
            self._after_backward.append(stats.max_allocated_bytes)
        self.step.after_backward = None  # the first backward only

    def __enter__(self) -> AllocatorPeakTracker:
        self.device.synchronize()
        self.device.reset_peaks()
        self.step.after_backward = self._note_backward
        return self

    def __exit__(self, *exc: Any) -> None:
        self.step.after_backward = None
        stats = self.device.allocator_stats()
        if stats is not None:
            self.result = AllocatorPeak(stats, self._after_backward[0] if self._after_backward else None)


class EnergyMeter:
    """Joules the card used between enter and exit (`.result`; None without NVML or an energy counter)."""

    def __init__(self, reader: NvmlReader | None) -> None:
        self.reader = reader
        self._start: int | None = None
        self.result: float | None = None

    def __enter__(self) -> EnergyMeter:
        self._start = self.reader.energy_mj() if self.reader is not None else None
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.reader is None or self._start is None:
            return
        end = self.reader.energy_mj()
        if end is not None:
            self.result = (end - self._start) / 1000.0  # the counter is in millijoules


def choose_peak(allocator: AllocatorPeak | None, tracked: TrackedPeak | None,
                sampled: SamplerResult | None) -> tuple[int | None, str | None, int | None]:
    """The best peak figure for the device, its name, and the forward+backward peak in the same terms.

    On CUDA, what the caching allocator reserved: exact, and what counts against the card. On CPU, the live
    tensor bytes of the tracked step: RSS is sampled and overstates (glibc keeps freed memory), so it is the
    last resort.
    """
    if allocator is not None:
        return allocator.stats.max_reserved_bytes, PeakSource.TORCH_RESERVED, allocator.fwd_bwd_peak_bytes
    if tracked is not None:
        return tracked.tensor_peak_bytes, PeakSource.TENSOR, tracked.fwd_bwd_peak_bytes
    if sampled is not None:
        return sampled.rss_peak_bytes, PeakSource.RSS, None
    return None, None, None


def outside_allocator(reserved: int | None, nvml_process: int | None) -> int | None:
    """What this process holds on the card beyond the allocator's segments (context, NCCL, ...)."""
    return None if reserved is None or nvml_process is None else nvml_process - reserved


def memory_figures(allocator: AllocatorPeak | None, tracked: TrackedPeak | None,
                   sampled: SamplerResult | None) -> dict[str, Any]:
    """A compare row's memory figures: every source the trial read, and the best peak for the device."""
    peak_bytes, peak_source, fwd_bwd_peak = choose_peak(allocator, tracked, sampled)
    stats = allocator.stats if allocator else None
    return {
        "peak_bytes": peak_bytes,
        "peak_source": peak_source,
        "fwd_bwd_peak_bytes": fwd_bwd_peak,
        "tensor_peak_bytes": tracked.tensor_peak_bytes if tracked else None,
        "grad_bytes": tracked.grad_bytes if tracked else None,
        "breakdown": tracked.breakdown if tracked else {},
        "torch_max_allocated_bytes": stats.max_allocated_bytes if stats else None,
        "torch_max_reserved_bytes": stats.max_reserved_bytes if stats else None,
        "alloc_retries": stats.alloc_retries if stats else None,
        "ooms": stats.ooms if stats else None,
        "rss_peak_bytes": sampled.rss_peak_bytes if sampled else None,
        "nvml_device_peak_bytes": sampled.nvml_device_peak_bytes if sampled else None,
        "nvml_process_peak_bytes": sampled.nvml_process_peak_bytes if sampled else None,
        "outside_allocator_bytes": outside_allocator(stats.max_reserved_bytes if stats else None,
                                                     sampled.nvml_process_peak_bytes if sampled else None),
        "sampler_samples": sampled.samples if sampled else None,
    }
