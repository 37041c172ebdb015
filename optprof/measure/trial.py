"""One trial: real training steps of one optimizer on synthetic tokens, timed and measured, as one row.

A trial runs in the process that calls `run_trial`; `processes/isolated.py` gives each one a fresh process. The order:
build the model and optimizer, warm up (lazy state gets allocated), time `steps` steps with the memory
sampler, the allocator's peaks and the energy counter running, account the optimizer's state, then run one
more, untimed step under torch's MemTracker for the tensor-level peak and its breakdown.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from optprof.config import (
    REPLICATED_STRATEGIES,
    ModelSelection,
    Strategy,
    TrainingSettings,
    parameter_dtype,
)
from optprof.distributed.sharding import wrap_for_strategy, zero1_optimizer
from optprof.errors import error_text
from optprof.measure.device import Device, NvmlFactory, device_facts, nvml_reader_for, open_device
from optprof.measure.flops import device_peak_flops, model_flops_per_token
from optprof.measure.nvml import NvmlReader, open_backend
from optprof.measure.routing import RoutingCounter
from optprof.measure.sampler import MemorySampler, SamplerResult, process_rss
from optprof.measure.snapshot import cuda_memory_history, snapshot_path
from optprof.measure.stats import optimizer_step_figures, precise_enough, timing_figures
from optprof.measure.step import (
    StepTimes,
    TrainStep,
    configure_model,
    make_batches,
    release_freed_memory,
    storage_bytes,
)
from optprof.measure.tracker import (
    AllocatorPeak,
    AllocatorPeakTracker,
    EnergyMeter,
    TrackedPeak,
    memory_figures,
    tracked_step,
)
from optprof.model.info import trainable_parameters
from optprof.model.loading import load_selection
from optprof.optimizers.implementation import set_implementation
from optprof.optimizers.outcome import is_out_of_memory, status_of
from optprof.optimizers.registry import (
    OptimizerEntry,
    availability,
    distributed_world_size,
    resolve_optimizers,
)
from optprof.optimizers.state import account_state, logical_state_bytes
from optprof.quiet import quiet_libraries
from optprof.results.rows import CompareRow
from optprof.results.vocab import DERIVED_FWD_BWD_CUDA, DERIVED_MFU, DERIVED_OUTSIDE, PeakSource, Status

if TYPE_CHECKING:
    from optprof.model.info import ModelInfo

Progress = Callable[[str], None]

DDP_BUCKETS_NOTE = ("DDP's gradient buckets (about the gradients' size) live in its C++ reducer, which the "
                    "live-tensor peak does not see; on CUDA the allocator's peak includes them")


@dataclass(frozen=True)
class TrialSpec:
    model: ModelSelection
    optimizer: str  # registry name or package.module:Class
    training: TrainingSettings
    opt_args: dict[str, Any] = field(default_factory=dict)
    strategy: Strategy | None = None  # inside a process group (--gpus N); None: one device
    shard_size: int | None = None  # hsdp: ranks per shard group
    offload_optimizer: bool = False  # FSDP2's CPUOffloadPolicy: state on the host
    memory_snapshot_dir: str | None = None  # CUDA: the allocator's history over the tracked step, dumped here


@dataclass(frozen=True)
class TrialOutcome:
    row: CompareRow
    device: dict[str, Any]  # the device as this process saw it (name, memory, NVML match, driver)


def _silent(text: str) -> None:
    pass


def base_row(entry: OptimizerEntry, opt_args: dict[str, Any], training: TrainingSettings) -> CompareRow:
    return CompareRow(**entry.row_head(opt_args), status=Status.OK, micro_batch=training.micro_batch,
                      seq_len=training.seq_len, grad_accum=training.grad_accum, steps=training.steps)


def run_trial(spec: TrialSpec, progress: Progress = _silent, nvml: NvmlFactory = open_backend,
              device: Device | None = None, rank: int = 0) -> TrialOutcome:
    """The trial's row; an unavailable optimizer, an OOM or an error becomes the row's status and reason.

    `nvml` and `device` are for tests: a fake NVML backend, a fake torch.cuda behind a CudaDevice.
    """
    entry = resolve_optimizers([spec.optimizer])[0]
    base = base_row(entry, spec.opt_args, spec.training)
    reason = availability(entry)
    if reason is not None:
        return TrialOutcome(dataclasses.replace(base, status=Status.UNAVAILABLE, reason=reason), {})
    device = device or open_device(spec.training.device, rank)
    try:
        return _measure(spec, entry, base, device, progress, nvml, rank)
    except Exception as exc:
        ranks = distributed_world_size() if spec.strategy is not None else 1
        status, reason = status_of(exc, entry, ranks, spec.strategy or Strategy.DDP)
        return TrialOutcome(dataclasses.replace(base, status=status, reason=reason), {})


def build_step(spec: TrialSpec, entry: OptimizerEntry, device: Device,
               progress: Progress = _silent, rank: int = 0) -> tuple[TrainStep, ModelInfo]:
    """The model (seeded, so the same weights for every optimizer), its optimizer and the token batches."""
    import torch

    t = spec.training
    if t.seq_len is None:
        raise ValueError("TrainingSettings.seq_len must be resolved before a trial (config.resolve_seq_len)")
    torch.manual_seed(t.seed)
    progress("building the model")
    loaded = load_selection(spec.model, dtype=parameter_dtype(spec.model, t), device=device.torch_device)
    model, info = loaded.module, loaded.info
    model.train()
    configure_model(model, t)
    if spec.strategy is not None:
        model = wrap_for_strategy(model, spec.strategy, device.type, rank if device.type == "cuda" else None,
                                  spec.shard_size, spec.offload_optimizer, t)

    def build() -> Any:
        return entry.build(model, info, spec.opt_args)

    optimizer = zero1_optimizer(build) if spec.strategy == Strategy.ZERO1 else build()
    set_implementation(optimizer, t.update_impl, t.device, spec.opt_args, fake=False)
    batches = make_batches(info.vocab_size, t, device.torch_device, rank)
    return TrainStep(model, optimizer, trainable_parameters(model), batches, device, t), info


@contextlib.contextmanager
def _sampling(training: TrainingSettings, reader: NvmlReader | None) -> Iterator[MemorySampler | None]:
    if not training.sampler:
        yield None
        return
    with MemorySampler(training.sample_interval_s, reader) as sampler:
        yield sampler


@dataclass(frozen=True)
class _Measured:
    """What the timed and tracked steps gave, before it becomes a row."""

    sampled: SamplerResult | None
    allocator: AllocatorPeak | None
    tracked: TrackedPeak | None
    nvml_note: str | None
    nvml_seen: bool  # NVML was read for this process's card


def _measure(spec: TrialSpec, entry: OptimizerEntry, base: CompareRow, device: Device, progress: Progress,
             nvml: NvmlFactory, rank: int = 0) -> TrialOutcome:
    t = spec.training
    rss_baseline = process_rss()
    if t.memory_limit_bytes is not None:
        device.limit_memory(t.memory_limit_bytes)
    step, info = build_step(spec, entry, device, progress, rank)
    for i in range(t.warmup):
        progress(f"warm-up step {i + 1}/{t.warmup}")
        step.run()
    release_freed_memory()
    reader, nvml_facts, nvml_note = nvml_reader_for(device, nvml)
    times: list[StepTimes] = []
    with AllocatorPeakTracker(device, step) as allocator, EnergyMeter(reader) as energy, \
            _sampling(t, reader) as sampler, RoutingCounter(step.model) as routing:
        for i in range(t.steps):
            progress(f"timed step {i + 1}/{t.steps}")
            times.append(step.run())
    account = account_state(step.optimizer, step.params, entry.second_moment_keys)
    tracked = None
    snapshot = snapshot_path(spec.memory_snapshot_dir, entry.name, rank)
    breakdown_note = None
    if t.breakdown:
        progress("memory breakdown (one tracked step)")
        try:
            with cuda_memory_history(snapshot):
                tracked = tracked_step(step, account.state_bytes)
        except Exception as exc:  # the optional breakdown costs itself, not the row (reformer's reversible layers)
            if is_out_of_memory(exc):
                raise  # a finding about memory: the row's status
            breakdown_note = (f"the memory breakdown's tracked step failed ({error_text(exc)}): the row's figures "
                              "are the timed steps' alone, without the tensor-level peak")
    repetitions: list[float] = []
    if t.time_optimizer_step:  # last: repeated updates on one set of gradients move the weights off the trace
        progress("repeating the optimizer step for its timing")
        repetitions = step.repeat_optimizer_step(precise_enough)
    if reader is not None:
        reader.backend.shutdown()
    measured = _Measured(sampler.result if sampler is not None else None, allocator.result, tracked, nvml_note,
                         reader is not None)
    assert t.seq_len is not None
    tokens_per_step = t.micro_batch * t.seq_len * t.grad_accum * base.world_size
    timing = timing_figures(times, tokens_per_step)
    row = dataclasses.replace(
        base,
        **timing,
        **optimizer_step_figures(repetitions),
        **memory_figures(measured.allocator, measured.tracked, measured.sampled),
        **_work_figures(spec, step, info, device, tokens_per_step, timing["tokens_per_s"], energy.result),
        state_bytes=account.state_bytes,
        state_parts=account.parts if spec.strategy is None else (),  # a rank's parts would be its shard's
        expert_load=routing.expert_load,
        state_logical_bytes=logical_state_bytes(step.optimizer, step.params),
        param_bytes=storage_bytes(step.model.parameters()),
        rss_baseline_bytes=rss_baseline,
        loss_first=step.losses[0],
        loss_last=step.losses[-1],
        losses=tuple(step.losses),
        notes=tuple(_notes(spec, device, measured)) + ((breakdown_note,) if breakdown_note else ()) + ((
            f"memory snapshot of the tracked step: {snapshot} (open it in PyTorch's memory visualiser)",)
            if snapshot is not None and tracked is not None else ()),
    )
    return TrialOutcome(dataclasses.replace(row, derived=_derived(row)), {**device_facts(device), **nvml_facts})


def _derived(row: CompareRow) -> dict[str, str]:
    """The row's figures that are computed from measurements rather than measured, and how."""
    derived = {}
    if row.peak_source == PeakSource.TORCH_RESERVED and row.fwd_bwd_peak_bytes is not None:
        derived["fwd_bwd_peak_bytes"] = DERIVED_FWD_BWD_CUDA
    if row.mfu is not None:
        derived["mfu"] = DERIVED_MFU
    if row.outside_allocator_bytes is not None:
        derived["outside_allocator_bytes"] = DERIVED_OUTSIDE
    return derived


def _work_figures(spec: TrialSpec, step: TrainStep, info: ModelInfo, device: Device, tokens_per_step: int,
                  tokens_per_s: float, energy_j: float | None) -> dict[str, Any]:
    """Model FLOPs per token, MFU where the device's peak is known, energy and energy per token."""
    t = spec.training
    assert t.seq_len is not None
    flops_per_token = model_flops_per_token(step.model, info, t.seq_len)
    peak = _device_peak_flops(spec, device)
    return {
        "model_flops_per_token": flops_per_token,
        "mfu": flops_per_token * tokens_per_s / peak if peak else None,
        "energy_j": energy_j,
        "joules_per_token": energy_j / (tokens_per_step * t.steps) if energy_j is not None else None,
    }


def _device_peak_flops(spec: TrialSpec, device: Device) -> float | None:
    low_precision = spec.training.amp is not None or spec.model.dtype in ("bfloat16", "float16")
    return device_peak_flops(device.name(), device.type == "cuda", spec.training.peak_tflops, low_precision)


def _notes(spec: TrialSpec, device: Device, m: _Measured) -> list[str]:
    """What this trial could not measure here, and why."""
    notes = [m.nvml_note] if m.nvml_note else []
    if spec.strategy in REPLICATED_STRATEGIES and m.allocator is None and m.tracked is not None:
        notes.append(DDP_BUCKETS_NOTE)
    if m.sampled is not None and m.sampled.nvml_error is not None:
        notes.append(f"NVML failed while sampling ({m.sampled.nvml_error}): its peaks cover the time before")
    elif m.nvml_seen and m.sampled is not None and m.sampled.nvml_process_peak_bytes is None:
        notes.append("NVML did not report this process's memory (in a container it lists host PIDs)")
    if device.type == "cuda" and _device_peak_flops(spec, device) is None:
        notes.append("MFU needs the device's peak FLOP/s: pass --peak-tflops")
    return notes


def trial_in_child(spec: TrialSpec, progress: Progress, quiet: bool = True) -> TrialOutcome:
    """Entry point of a spawned trial process (see processes/isolated.py): library chatter off, then the trial."""
    if quiet:
        quiet_libraries()
    return run_trial(spec, progress)
