"""One trial: real training steps of one optimizer on synthetic tokens, timed and measured.

A trial runs in the process that calls `run_trial`; `isolate.py` gives each one a fresh process. The order:
build the model and optimizer, warm up (lazy state gets allocated), time `steps` steps with the memory
sampler running, account the optimizer's state, then run one more, untimed step under torch's MemTracker
for the tensor-level peak and its breakdown (tracking slows the step, so it is never timed).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import statistics
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from optprof.config import ModelSelection, TrainingSettings
from optprof.errors import error_text
from optprof.measure.device import AllocatorStats, Device, open_device
from optprof.measure.flops import model_flops_per_token, peak_flops
from optprof.measure.nvml import NvmlBackend, NvmlReader, find_nvml_device, open_backend
from optprof.measure.sampler import MemorySampler, SamplerResult, process_rss
from optprof.models import load_model
from optprof.optimizers.registry import OptimizerEntry, availability, package_version, resolve_optimizers
from optprof.optimizers.state import account_state, logical_state_bytes, state_tensors
from optprof.quiet import quiet_libraries
from optprof.results import (
    PEAK_RSS,
    PEAK_TENSOR,
    PEAK_TORCH_RESERVED,
    STATUS_FAILED,
    STATUS_OK,
    STATUS_OOM,
    STATUS_UNAVAILABLE,
    CompareRow,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

    from optprof.models import ModelInfo

Progress = Callable[[str], None]
NvmlFactory = Callable[[], tuple[NvmlBackend | None, str | None]]

AMP_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}
# MemTracker's and FSDPMemTracker's category names, folded into the breakdown's
TRACKER_PARAMETERS = ("PARAM", "BUFFER", "SHARDED_PARAM", "UNSHARDED_PARAM")
TRACKER_GRADIENTS = ("GRAD", "SHARDED_GRAD", "UNSHARDED_GRAD")


@dataclass(frozen=True)
class TrialSpec:
    model: ModelSelection
    optimizer: str  # registry name or package.module:Class
    training: TrainingSettings
    opt_args: dict[str, Any] = field(default_factory=dict)
    strategy: str | None = None  # "ddp" or "fsdp" inside a process group (--gpus N); None: one device


@dataclass(frozen=True)
class TrialOutcome:
    row: CompareRow
    device: dict[str, Any]  # the device as this process saw it (name, memory, NVML match, driver)


@dataclass(frozen=True)
class StepTimes:
    forward_s: float
    backward_s: float
    clip_s: float
    optimizer_s: float
    total_s: float


def _silent(text: str) -> None:
    pass


def is_out_of_memory(exc: BaseException) -> bool:
    import torch

    text = str(exc)
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text


def release_freed_memory() -> None:
    """Give freed heap memory back to the OS (glibc keeps it), so RSS in the timed steps starts from live data."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def storage_bytes(tensors: Any) -> int:
    """Bytes of the distinct storages behind `tensors` (tied weights count once; a DTensor: its local shard)."""
    seen: dict[int, int] = {}
    for tensor in tensors:
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        storage = local.untyped_storage()
        seen[storage._cdata] = storage.nbytes()
    return sum(seen.values())


class TrainStep:
    """forward + backward for each micro-batch, gradient clipping, optimizer step + zero_grad: timed by phase."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, params: list[nn.Parameter],
                 batches: list[torch.Tensor], device: Device, training: TrainingSettings) -> None:
        import torch

        self.model = model
        self.optimizer = optimizer
        self.params = params
        self.batches = batches
        self.device = device
        self.training = training
        self.amp_dtype = getattr(torch, AMP_DTYPES[training.amp]) if training.amp else None
        self.scaler = torch.amp.GradScaler(device.type) if training.amp == "fp16" else None  # fp16 underflows
        self.losses: list[float] = []
        self.before_forward: Callable[[], None] | None = None  # the tracked step resets MemTracker here
        self.after_backward: Callable[[], None] | None = None  # reads the forward+backward peak
        self.grad_bytes: int | None = None  # measured when measure_grads is set (untimed steps only)
        self.measure_grads = False

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        import torch

        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def run(self) -> StepTimes:
        import torch

        device, scaler = self.device, self.scaler
        forward_s: list[tuple[Any, Any]] = []
        backward_s: list[tuple[Any, Any]] = []
        loss_sum: torch.Tensor | None = None
        start = device.mark()
        for batch in self.batches:
            if self.before_forward is not None:
                self.before_forward()
            a = device.mark()
            with self._autocast():
                loss = self.model(input_ids=batch, labels=batch, use_cache=False).loss / len(self.batches)
            b = device.mark()
            (scaler.scale(loss) if scaler is not None else loss).backward()
            c = device.mark()
            forward_s.append((a, b))
            backward_s.append((b, c))
            loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
        if self.measure_grads:
            self.grad_bytes = storage_bytes(p.grad for p in self.params if p.grad is not None)
        if self.after_backward is not None:
            self.after_backward()
        clip_start = device.mark()
        if self.training.grad_clip is not None:
            if scaler is not None:
                scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.training.grad_clip)
        step_start = device.mark()
        if scaler is not None:
            scaler.step(self.optimizer)
            scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        end = device.mark()
        device.synchronize()
        assert loss_sum is not None
        self.losses.append(float(loss_sum))
        return StepTimes(
            forward_s=sum(device.seconds(x, y) for x, y in forward_s),
            backward_s=sum(device.seconds(x, y) for x, y in backward_s),
            clip_s=device.seconds(clip_start, step_start),
            optimizer_s=device.seconds(step_start, end),
            total_s=device.seconds(start, end),
        )


@dataclass(frozen=True)
class TrackedPeak:
    tensor_peak_bytes: int
    breakdown: dict[str, int]
    grad_bytes: int | None
    fwd_bwd_peak_bytes: int  # the peak up to the end of backward


def _tracker_breakdown(snapshot: dict[Any, int], state_bytes: int) -> dict[str, int]:
    """MemTracker's categories at the peak, folded into parameters, gradients, state, activations, temporaries.

    MemTracker files everything created inside optimizer.step() as optimizer memory, and tensors we registered
    ourselves (inputs, optimizer helpers outside `optimizer.state`) as other. All of the state is alive at the
    peak (it persists between steps), so the state is `state_bytes` and the rest of those two is temporary.
    """
    by_name = {getattr(k, "name", str(k)): v for k, v in snapshot.items()}

    def total(names: tuple[str, ...]) -> int:
        return sum(by_name.get(name, 0) for name in names)

    optimizer_and_other = total(("OPT", "OTH"))
    state = min(state_bytes, optimizer_and_other)
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


def peak_tracker(base: type, *args: Any) -> Any:
    """torch's MemTracker (or FSDPMemTracker, `base`), minus its per-module peak snapshots, which optprof
    does not use and which cost a pass over every module at every op (about 20 s for one Llama-2-7B step
    on fake tensors). Where this torch lacks the method replaced, the plain (slower) tracker."""
    if not hasattr(base, "_update_peak_stats"):
        return base(*args)

    class PeakOnly(base):  # type: ignore[misc, valid-type]
        def _update_peak_stats(self, peak_state: Any) -> None:
            for dev, snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < snap["Total"]:
                    self._peak_mem[dev] = snap["Total"]
                    self._peak_mem_snap[dev] = dict(snap)

    return PeakOnly(*args)


def tracked_step(step: TrainStep, state_bytes: int, tracker: Any = None) -> TrackedPeak:
    """One untimed step under torch's MemTracker: the peak of live tensor bytes and what they were.

    `tracker`: one already set up (FSDPMemTracker for a sharded model); by default a MemTracker.
    """
    import torch
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.distributed.fsdp import FSDPModule

    if tracker is None and isinstance(step.model, FSDPModule):  # sharded: FSDP's own categories and buffers
        tracker = peak_tracker(FSDPMemTracker, step.model, step.optimizer)
        tracker.track_inputs(tuple(step.batches))
    elif tracker is None:
        tracker = peak_tracker(MemTracker)
        # Registered as "other" first; registering the optimizer afterwards re-labels its own state.
        tracker.track_external(*state_tensors(step.optimizer, step.params), *step.batches)
        tracker.track_external(step.model, step.optimizer)
    placement = torch.device(step.device.torch_device)

    def peak_snapshot() -> dict[Any, int]:
        peaks = [snap for dev, snap in tracker.get_tracker_snapshot("peak").items() if dev.type == placement.type]
        if not peaks:
            raise RuntimeError("MemTracker saw no tensors on the trial's device")
        return peaks[0]

    fwd_bwd: list[int] = []
    step.before_forward = tracker.reset_mod_stats  # MemTracker refuses a second root forward otherwise
    step.after_backward = lambda: fwd_bwd.append(int(peak_snapshot().get("Total", 0)))
    step.measure_grads = True
    try:
        with tracker:
            step.run()
    finally:
        step.before_forward = step.after_backward = None
        step.measure_grads = False
    snapshot = peak_snapshot()
    total = int(snapshot.get("Total", 0))
    categories = {k: int(v) for k, v in snapshot.items() if k != "Total"}
    return TrackedPeak(total, _tracker_breakdown(categories, state_bytes), step.grad_bytes, fwd_bwd[0])


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), q in [0, 1]."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def choose_peak(allocator: AllocatorStats | None, tracked: TrackedPeak | None,
                sampled: SamplerResult | None) -> tuple[int | None, str | None]:
    """The best peak figure for the device, and its name.

    On CUDA, what the caching allocator reserved: exact, and what counts against the card. On CPU, the live
    tensor bytes of the tracked step: RSS is sampled and overstates (glibc keeps freed memory), so it is the
    last resort.
    """
    if allocator is not None:
        return allocator.max_reserved_bytes, PEAK_TORCH_RESERVED
    if tracked is not None:
        return tracked.tensor_peak_bytes, PEAK_TENSOR
    if sampled is not None:
        return sampled.rss_peak_bytes, PEAK_RSS
    return None, None


def _nvml_reader(device: Device, factory: NvmlFactory) -> tuple[NvmlReader | None, dict[str, Any], str | None]:
    """(reader for this process on the trial's card, facts for the report, why NVML is not used)."""
    if device.type != "cuda":
        return None, {}, None
    backend, why = factory()
    if backend is None:
        return None, {}, why
    identity = device.identity()
    try:
        handle, matched_by = find_nvml_device(backend, identity)
    except LookupError as exc:
        return None, {}, str(exc)
    facts = {"nvml_name": backend.name(handle), "nvml_matched_by": matched_by, "driver": backend.driver_version(),
             "uuid": identity.uuid, "pci_bus_id": identity.pci_bus_id}
    return NvmlReader(backend, handle, os.getpid()), facts, None


def device_facts(device: Device) -> dict[str, Any]:
    import torch

    facts: dict[str, Any] = {"type": device.type, "name": device.name(), "total_memory_bytes": device.total_memory(),
                             "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        facts["cuda"] = torch.version.cuda
    return facts


def base_row(entry: OptimizerEntry, opt_args: dict[str, Any], training: TrainingSettings) -> CompareRow:
    return CompareRow(
        entry.name, entry.package, package_version(entry.package), entry.family, STATUS_OK,
        settings=entry.settings(opt_args) if entry.settings else None,
        micro_batch=training.micro_batch, seq_len=training.seq_len, grad_accum=training.grad_accum,
        steps=training.steps,
    )


def run_trial(spec: TrialSpec, progress: Progress = _silent, nvml: NvmlFactory = open_backend,
              device: Device | None = None, rank: int = 0) -> TrialOutcome:
    """The trial's row; an unavailable optimizer, an OOM or an error becomes the row's status and reason.

    `nvml` and `device` are for tests: a fake NVML backend, a fake torch.cuda behind a CudaDevice.
    """
    entry = resolve_optimizers([spec.optimizer])[0]
    base = base_row(entry, spec.opt_args, spec.training)
    reason = availability(entry)
    if reason is not None:
        return TrialOutcome(dataclasses.replace(base, status=STATUS_UNAVAILABLE, reason=reason), {})
    device = device or open_device(spec.training.device, rank)
    try:
        return _measure(spec, entry, base, device, progress, nvml, rank)
    except Exception as exc:
        status = STATUS_OOM if is_out_of_memory(exc) else STATUS_FAILED
        return TrialOutcome(dataclasses.replace(base, status=status, reason=error_text(exc)), {})


@contextlib.contextmanager
def _sampling(training: TrainingSettings, reader: NvmlReader | None) -> Iterator[MemorySampler | None]:
    if not training.sampler:
        yield None
        return
    with MemorySampler(training.sample_interval_s, reader) as sampler:
        yield sampler


def build_step(spec: TrialSpec, entry: OptimizerEntry, device: Device,
               progress: Progress = _silent, rank: int = 0) -> tuple[TrainStep, ModelInfo]:
    """The model (seeded, so the same weights for every optimizer), its optimizer and the token batches."""
    import torch

    t = spec.training
    if t.seq_len is None:
        raise ValueError("TrainingSettings.seq_len must be resolved before a trial (compare.resolve_seq_len)")
    torch.manual_seed(t.seed)
    progress("building the model")
    loaded = load_model(spec.model.model, dtype="float32" if t.amp else spec.model.dtype, device=device.torch_device,
                        revision=spec.model.revision, trust_remote_code=spec.model.trust_remote_code)
    model, info = loaded.module, loaded.info
    model.train()
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if spec.strategy is not None:
        from optprof.dist import wrap_for_strategy

        model = wrap_for_strategy(model, spec.strategy, device.type, rank if device.type == "cuda" else None)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = entry.build(model, info, spec.opt_args)
    batches = make_batches(info.vocab_size, t, device.torch_device, rank)
    return TrainStep(model, optimizer, params, batches, device, t), info


def make_batches(vocab_size: int, training: TrainingSettings, torch_device: str, rank: int = 0) -> list[torch.Tensor]:
    """`grad_accum` batches of random token ids, the same for every optimizer (seeded; each rank its own)."""
    import torch

    assert training.seq_len is not None
    tokens = torch.Generator().manual_seed(training.seed + rank)
    shape = (training.micro_batch, training.seq_len)
    return [torch.randint(0, vocab_size, shape, generator=tokens).to(torch_device) for _ in range(training.grad_accum)]


def _measure(spec: TrialSpec, entry: OptimizerEntry, base: CompareRow, device: Device, progress: Progress,
             nvml: NvmlFactory, rank: int = 0) -> TrialOutcome:
    t = spec.training
    rss_baseline = process_rss()
    if t.memory_limit_bytes is not None:
        device.limit_memory(t.memory_limit_bytes)
    step, info = build_step(spec, entry, device, progress, rank)
    model, optimizer, params = step.model, step.optimizer, step.params
    assert t.seq_len is not None

    for i in range(t.warmup):
        progress(f"warm-up step {i + 1}/{t.warmup}")
        step.run()
    release_freed_memory()
    device.synchronize()
    device.reset_peaks()
    reader, nvml_facts, nvml_note = _nvml_reader(device, nvml)
    allocated_after_backward: list[int] = []  # CUDA: the allocator's peak through the first timed backward

    def note_backward() -> None:
        stats = device.allocator_stats()
        if stats is not None:
            allocated_after_backward.append(stats.max_allocated_bytes)
        step.after_backward = None

    step.after_backward = note_backward
    times: list[StepTimes] = []
    with _sampling(t, reader) as sampler:
        for i in range(t.steps):
            progress(f"timed step {i + 1}/{t.steps}")
            times.append(step.run())
    sampled: SamplerResult | None = sampler.result if sampler is not None else None
    allocator = device.allocator_stats()
    account = account_state(optimizer, params, entry.second_moment_keys)
    tracked = None
    if t.breakdown:
        progress("memory breakdown (one tracked step)")
        tracked = tracked_step(step, account.state_bytes)
    if reader is not None:
        reader.backend.shutdown()

    totals = [s.total_s for s in times]
    mean_step = statistics.fmean(totals)
    step_p50 = percentile(totals, 0.5)
    tokens_per_step = t.micro_batch * t.seq_len * t.grad_accum * base.world_size
    tokens_per_s = tokens_per_step / step_p50
    flops_per_token = model_flops_per_token(model, info, t.seq_len)
    low_precision = t.amp is not None or spec.model.dtype in ("bfloat16", "float16")
    peak_device_flops = t.peak_tflops * 1e12 if t.peak_tflops else (
        peak_flops(device.name(), low_precision) if device.type == "cuda" else None)
    notes = [nvml_note] if nvml_note else []
    if spec.strategy == "ddp" and allocator is None and tracked is not None:
        notes.append("DDP's gradient buckets (about the gradients' size) live in its C++ reducer, which the "
                     "live-tensor peak does not see; on CUDA the allocator's peak includes them")
    if reader is not None and sampled is not None and sampled.nvml_process_peak_bytes is None:
        notes.append("NVML did not report this process's memory (in a container it lists host PIDs)")
    if peak_device_flops is None and device.type == "cuda":
        notes.append("MFU needs the device's peak FLOP/s: pass --peak-tflops")

    energy_j = sampled.energy_j if sampled else None
    peak_bytes, peak_source = choose_peak(allocator, tracked, sampled)
    fwd_bwd_peak = None
    if peak_source == PEAK_TORCH_RESERVED and allocator is not None and allocated_after_backward:
        # in reserved terms: what the allocator holds beyond live tensors comes on top
        fwd_bwd_peak = allocated_after_backward[0] + allocator.max_reserved_bytes - allocator.max_allocated_bytes
    elif peak_source == PEAK_TENSOR and tracked is not None:
        fwd_bwd_peak = tracked.fwd_bwd_peak_bytes
    row = dataclasses.replace(
        base,
        tokens_per_s=tokens_per_s,
        step_s_p50=step_p50,
        step_s_p90=percentile(totals, 0.9),
        forward_s=statistics.fmean(s.forward_s for s in times),
        backward_s=statistics.fmean(s.backward_s for s in times),
        clip_s=statistics.fmean(s.clip_s for s in times),
        optimizer_s=statistics.fmean(s.optimizer_s for s in times),
        optimizer_share=statistics.fmean(s.optimizer_s for s in times) / mean_step,
        model_flops_per_token=flops_per_token,
        mfu=flops_per_token * tokens_per_s / peak_device_flops if peak_device_flops else None,
        state_bytes=account.state_bytes,
        state_logical_bytes=logical_state_bytes(optimizer, params),
        param_bytes=storage_bytes(model.parameters()),
        grad_bytes=tracked.grad_bytes if tracked else None,
        peak_bytes=peak_bytes,
        peak_source=peak_source,
        tensor_peak_bytes=tracked.tensor_peak_bytes if tracked else None,
        fwd_bwd_peak_bytes=fwd_bwd_peak,
        torch_max_allocated_bytes=allocator.max_allocated_bytes if allocator else None,
        torch_max_reserved_bytes=allocator.max_reserved_bytes if allocator else None,
        rss_peak_bytes=sampled.rss_peak_bytes if sampled else None,
        rss_baseline_bytes=rss_baseline,
        nvml_device_peak_bytes=sampled.nvml_device_peak_bytes if sampled else None,
        nvml_process_peak_bytes=sampled.nvml_process_peak_bytes if sampled else None,
        alloc_retries=allocator.alloc_retries if allocator else None,
        ooms=allocator.ooms if allocator else None,
        energy_j=energy_j,
        joules_per_token=energy_j / (tokens_per_step * t.steps) if energy_j is not None else None,
        breakdown=tracked.breakdown if tracked else {},
        loss_first=step.losses[0],
        loss_last=step.losses[-1],
        losses=tuple(step.losses),
        step_times_s=tuple(totals),
        sampler_samples=sampled.samples if sampled else None,
        notes=tuple(notes),
    )
    return TrialOutcome(row, {**device_facts(device), **nvml_facts})


def trial_in_child(spec: TrialSpec, progress: Progress, quiet: bool = True) -> TrialOutcome:
    """Entry point of a spawned trial process (see isolate.py): library chatter off, then the trial."""
    if quiet:
        quiet_libraries()
    return run_trial(spec, progress)
