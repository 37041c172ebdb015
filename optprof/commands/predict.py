"""`optprof predict`: the training step on fake tensors under torch's MemTracker, without a GPU.

FakeTensorMode gives every tensor its shape, dtype and storage size but no memory, so the same code that
`compare` runs (the model's forward and backward, the real optimizer's step, MemTracker) runs here for a
7B model on a laptop. What fake CPU tensors cannot see is listed in the report's `assumptions`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable
from typing import Any

from optprof.commands.fake_step import (
    ATTENTION_DROPOUT_KEYS,
    DIED,
    FakeTrainer,
    NeedTrace,
    SharedTrainer,
    SharedView,
    StepFailed,
    StepFailure,
    classified,
    fake_run,
)
from optprof.commands.micro_batch import predict_max, search_max_micro_batch
from optprof.commands.shallow_step import (
    PeriodicView,
    Shallow,
    copy_traces,
    layer_periodic_method,
    model_period,
    shallow_copies,
    written_traces,
)
from optprof.config import (
    DeviceKind,
    ModelSelection,
    PredictConfig,
    Strategy,
    TrainingSettings,
    check_training,
    resolve_seq_len,
    step_record,
)
from optprof.device.alloc_conf import AllocatorConfig
from optprof.device.costs import SM90_WORKSPACE_BYTES, calibrated_cost, rank_costs
from optprof.device.local_times import collective_key, measured_collectives, measured_times
from optprof.device.ops import OpKind, OpRecord
from optprof.device.periodic import NotPeriodic
from optprof.device.replay import replay
from optprof.device.snapshot import write_snapshot
from optprof.device.timeline import StepTime, catalog_coster, step_time
from optprof.device.trace import AllocationTrace, extrapolated
from optprof.hardware.catalog import DEFAULT_GPUS_PER_NODE, LOCAL, Cluster, cluster, load_catalog, target_gpu
from optprof.interrupts import Interrupted, stop_children
from optprof.measure.flops import model_flops_per_token
from optprof.model.info import config_values
from optprof.model.loading import default_loaded_dtype, load_config, load_selection
from optprof.model.setups import QLORA_PREDICTED
from optprof.optimizers.registry import OptimizerEntry, availability, check_opt_args, resolve_optimizers
from optprof.optimizers.state import PlaceholderScalars
from optprof.optimizers.trained import untrained_in, untrained_note
from optprof.processes.branching import can_branch
from optprof.processes.forked import run_each, torch_threads
from optprof.results.reports import PredictReport, command_config
from optprof.results.rows import FinishedRows, PredictRow, Probe
from optprof.results.vocab import MaxMethod, Status
from optprof.trainers import RECIPES

# The largest micro-batch solved from the steps at two sizes, then confirmed at it and the next (off: the search
# from micro-batch 1, probe by probe; the tests run both). From 2 and 3, not 1 and 2: at micro-batch 1 models
# often take a path of their own (one allocation fewer on the demo model), so no line runs through 1 and 2
SOLVE_FROM_TWO_TRACES = True
SOLVED_FROM = (2, 3)

# what a row is read from: one optimizer's own fake model, its side of a shared one, or traces written from copies
Trainer = FakeTrainer | SharedView | PeriodicView

ASSUMPTIONS_COMMON = (
    "the training step ran on fake tensors (torch FakeTensorMode) under torch's MemTracker: the figures "
    "are live tensor bytes, not allocator or driver memory",
    "inputs are dense random tokens (no padding, no packing), as compare uses",
)
ASSUMPTIONS_CUDA = (
    "CUDA kernels were not run: the step used CPU kernels on fake tensors",
    "autocast (--amp) follows CPU autocast's op lists, which differ slightly from CUDA's",
)


def allocator_notes(config: PredictConfig) -> list[tuple[dict[str, Any] | None, str]]:
    """With the allocator model: the model's own assumption, and each named cost outside the allocator (or the
    --calibration or --reserve that replaced them), as (the report's record, the assumption's line)."""
    if config.alloc_conf is None:
        return []
    gpu = target_gpu(config.gpu, config.gpu_spec)
    workspace = gpu.cublas_workspace_bytes if gpu is not None else SM90_WORKSPACE_BYTES
    where = f"on {gpu.name}" if gpu is not None else "assumed sm90 (no --gpu)"
    lines: list[tuple[dict[str, Any] | None, str]] = [(None, (
        "reserved bytes: the tracked step's allocations and frees, with their streams (FSDP2's all-gather and "
        "reduce-scatter buffers on their own), replayed twice through a model of torch 2.13's CUDACachingAllocator "
        f"(allocator configuration {config.alloc_conf}); cuBLAS's {workspace:,}-byte workspace ({where}) "
        "allocated through it for the forward and the backward thread; the largest micro-batch is the largest "
        "whose replay does not run out of memory"))]
    if config.calibration is not None:
        cost = calibrated_cost(config.calibration, config.reserve_bytes)
        return [*lines, ({"name": cost.name, "bytes": cost.bytes, "source": cost.source},
                         f"outside the allocator: {cost.bytes:,} bytes per device ({cost.source})")]
    per_node = config.gpus_per_node or min(DEFAULT_GPUS_PER_NODE, config.gpus)
    costs = rank_costs(config.strategy, config.gpus, config.shard_size, gpu, per_node)
    if sum(cost.bytes for cost in costs) != config.reserve_bytes:
        return [*lines, ({"name": "--reserve", "bytes": config.reserve_bytes, "source": "given"},
                         f"outside the allocator: {config.reserve_bytes:,} bytes per device, as --reserve gave")]
    return [*lines, *(({"name": c.name, "bytes": c.bytes, "source": c.source},
                       f"outside the allocator: {c.name} {c.bytes:,} bytes per device ({c.source})") for c in costs)]


def recipe_notes(training: TrainingSettings, selection: ModelSelection, replicas: int = 1) -> tuple[str, ...]:
    """What a --recipe set and where it comes from, and how the prediction stands for a replicating recipe."""
    if training.recipe is None:
        return ()
    recipe = RECIPES[training.recipe]
    notes = [f"recipe {recipe.name}: the step {recipe.trainer} runs, read from {recipe.source} (`optprof recipes` "
             "gives the file and function behind each setting); explicit flags override it"]
    if recipe.note:
        notes.append(f"recipe {recipe.name}: {recipe.note}")
    if recipe.dtype_as_loaded:
        original = load_config(selection.model, revision=selection.revision,
                               trust_remote_code=selection.trust_remote_code)[0]  # before optprof set a dtype
        named = getattr(original, "dtype", None) or getattr(original, "torch_dtype", None)
        if selection.dtype != default_loaded_dtype(original):
            notes.append(f"recipe {recipe.name}: parameters in {selection.dtype}, as --dtype asked (from_pretrained "
                         f"would load them in {default_loaded_dtype(original)})")
        else:
            notes.append(f"recipe {recipe.name}: parameters as transformers' from_pretrained loads them by default "
                         + (f"(the config's dtype, {named})" if named else "(the config names no dtype, so "
                            "from_pretrained would take the checkpoint's, which optprof does not read: float32 "
                            "assumed; pass --dtype)"))
    if replicas > 1:
        notes.append(f"recipe {recipe.name} replicates the model under DDP over {replicas} ranks: the figures are one "
                     "rank's, which each rank holds; DDP's gradient buckets (about the gradients' size, beside them "
                     "unless gradient_as_bucket_view) are not included")
    return tuple(notes)


def _base_row(entry: OptimizerEntry, config: PredictConfig, training: TrainingSettings) -> PredictRow:
    return PredictRow(**entry.row_head(config.opt_args), status=Status.OK, micro_batch=training.micro_batch,
                      seq_len=training.seq_len, grad_accum=training.grad_accum, world_size=config.gpus)


def snapshot_file(target: str, optimizer: str, optimizers: int) -> str:
    """One file per optimizer when several are predicted: NAME.pickle -> NAME-adamw.pickle."""
    if optimizers == 1:
        return target
    stem, dot, suffix = target.rpartition(".")
    return f"{stem}-{optimizer}.{suffix}" if dot else f"{target}-{optimizer}"


def predict_optimizer(config: PredictConfig, entry: OptimizerEntry, training: TrainingSettings,
                      progress: Callable[[str], None]) -> PredictRow:
    """The entry's predicted peak at the micro-batch asked for, and its largest micro-batch when memory is given."""
    return predict_outcome(config, entry, training, progress)[0]


def predict_outcome(config: PredictConfig, entry: OptimizerEntry, training: TrainingSettings,
                    progress: Callable[[str], None]) -> tuple[PredictRow, bool]:
    """`predict_optimizer`'s row, by the full method (the optimizer's own fake model and steps), and whether the
    fake step failed because the model read tensor values."""
    started = time.perf_counter()
    base = _base_row(entry, config, training)
    reason = availability(entry)
    if reason is not None:
        return dataclasses.replace(base, status=Status.UNAVAILABLE, reason=reason), False
    scalars: PlaceholderScalars | None = None
    try:
        with fake_run(config, training) as (mesh, scalars):
            progress("building the fake model and warming up")
            trainer = FakeTrainer(config, entry, training, mesh)
            row = _traced_row(trainer, config, entry, training, progress)
    except Exception as exc:
        failed, values_read = classified(exc, entry, config, scalars)
        return dataclasses.replace(base, status=failed.status, reason=failed.reason,
                                   predict_s=time.perf_counter() - started), values_read
    return dataclasses.replace(row, predict_s=time.perf_counter() - started), False


def solved_max(trainer: Trainer, usable: int, cap: int) -> int | None:
    """The largest micro-batch that fits, solved from the tracked steps at SOLVED_FROM and the size after it
    (None: no solution, the search decides). With the allocator model, the trace at each size is extrapolated
    from those two (each allocation's size affine in the micro-batch, `device.trace.extrapolated`) and replayed:
    a bisection of replays from a guess, no step traced. Without it, the line of the tensor peaks
    (`micro_batch.predict_max`)."""
    low_size, high_size = SOLVED_FROM
    if cap < high_size:
        return None
    if not trainer.records:
        probes = {size: Probe(size, peak.tensor_peak_bytes <= usable, peak.tensor_peak_bytes, usable,
                              growing_bytes=peak.fwd_bwd_peak_bytes)
                  for size, peak in ((low_size, trainer.peak(low_size)), (high_size, trainer.peak(high_size)))}
        solved = predict_max(probes)
        return None if solved is None or solved < 1 else min(solved, cap)
    low, high = trainer.trace(low_size), trainer.trace(high_size)
    allocator = AllocatorConfig.parse(trainer.alloc_conf)

    def fits(micro_batch: int) -> bool | None:
        trace = extrapolated(low, high, low_size, micro_batch)
        return None if trace is None else replay(trace, allocator, usable).oom is None

    largest, smallest_miss = 0, cap + 1
    # a first guess on the line of the tensor peaks from the reserved bytes at `low_size` (the replay the search
    # confirms with, where the step fits); where it is right (and the next size does not fit) the bisection is over
    # in two replays instead of about log2(cap)
    growth = trainer.peak(high_size).tensor_peak_bytes - trainer.peak(low_size).tensor_peak_bytes
    at_low = trainer.simulated(low_size, usable)
    if growth > 0 and at_low is not None:
        guess = 1 if at_low.oom else max(1, min(cap, low_size + (usable - at_low.peak_reserved) // growth))
        for probe in (guess, guess + 1):
            if largest < probe < smallest_miss:
                answer = fits(probe)
                if answer is None:
                    return None
                largest, smallest_miss = (probe, smallest_miss) if answer else (largest, probe)
    if not largest:
        if not fits(1):
            return None  # not even 1 (or no line through the two): the search says so with its own probes
        largest = 1
    while largest + 1 < smallest_miss:
        middle = (largest + smallest_miss) // 2
        answer = fits(middle)
        if answer is None:
            return None
        largest, smallest_miss = (middle, smallest_miss) if answer else (largest, middle)
    return largest


@functools.cache
def _catalog_cluster(gpu: str, gpu_spec: str | None, network: str | None, gpus_per_node: int | None,
                     gpus: int) -> Cluster:
    from pathlib import Path

    return cluster(load_catalog(None if gpu_spec is None else Path(gpu_spec)), gpu, network, gpus_per_node, gpus)


def time_target(config: PredictConfig) -> Cluster | None:
    """The catalog cluster a --gpu names (None: --gpu local or no time)."""
    if config.gpu is None or config.gpu == LOCAL:
        return None
    return _catalog_cluster(config.gpu, config.gpu_spec, config.network, config.gpus_per_node, config.gpus)


def step_seconds(trace: AllocationTrace, config: PredictConfig, training: TrainingSettings) -> StepTime:
    """The traced step's time on the --gpu's cluster, or from op times measured on this machine (--gpu local)."""
    cluster_ = time_target(config)
    if cluster_ is not None:
        return step_time(trace.ops, catalog_coster(cluster_), cluster_.gpu.launch_s)
    import torch

    device = str(training.device)
    threads = torch.get_num_threads()
    if device == DeviceKind.CPU and config.gpus > 1:
        threads = max(1, (os.cpu_count() or 1) // config.gpus)  # CPU ranks share the cores (share_cores)
    with torch_threads(threads):
        times = measured_times(trace.ops, device)
    collectives = measured_collectives(trace.ops, threads) if device == DeviceKind.CPU else {}

    def measured(op: OpRecord) -> float:
        if op.kind == OpKind.COLLECTIVE:
            return collectives.get(collective_key(op)) or 0.0  # on a GPU: not timed (one device here)
        return times.get(op.key or "") or 0.0  # an op that cannot run on made-up values: none

    # a measured op time includes its dispatch and launch; gloo's collectives take the cores compute uses
    return step_time(trace.ops, measured, 0.0, overlap=device != DeviceKind.CPU)


def _time_fields(trainer: Trainer, micro_batch: int, config: PredictConfig,
                 training: TrainingSettings, suffix: str = "") -> dict[str, Any]:
    """The row's time figures at `micro_batch` (MFU is added by run_predict, which knows the model's FLOPs)."""
    timed = step_seconds(trainer.trace(micro_batch), config, training)
    tokens = micro_batch * (training.seq_len or 0) * training.grad_accum  # seq_len is resolved by run_predict
    per_gpu = tokens / timed.step_s if timed.step_s else None
    ranks = config.gpus * config.replicas  # every rank trains on its own tokens (data parallel)
    fields: dict[str, Any] = {f"predicted_step_s{suffix}": timed.step_s, f"predicted_phase_s{suffix}": timed.phase_s,
                              f"predicted_tokens_per_s_per_gpu{suffix}": per_gpu,
                              f"predicted_tokens_per_s{suffix}": None if per_gpu is None else per_gpu * ranks}
    if not suffix:
        fields["predicted_communication_s"] = timed.communication_s
    return fields


def _traced_row(trainer: Trainer, config: PredictConfig, entry: OptimizerEntry,
                training: TrainingSettings, progress: Callable[[str], None]) -> PredictRow:
    """The row from a trainer's tracked steps: the asked micro-batch, and the largest that fits when memory is
    given (solved from the steps at SOLVED_FROM and confirmed at it and the next, else searched). A SharedView raises
    NeedTrace for micro-batches it does not have yet."""
    usable = None if config.gpu_memory_bytes is None else config.gpu_memory_bytes - config.reserve_bytes
    solving = usable is not None and SOLVE_FROM_TWO_TRACES and config.max_micro_batch >= SOLVED_FROM[1]
    trainer.need([training.micro_batch, *(SOLVED_FROM if solving else ())])
    progress(f"micro-batch {training.micro_batch}")
    at = trainer.peak(training.micro_batch)
    simulated = trainer.simulated(training.micro_batch, usable)
    found = None
    method = None
    if usable is not None:
        def fits(micro_batch: int) -> Probe:
            progress(f"largest micro-batch: trying {micro_batch}")
            peak = trainer.peak(micro_batch)
            if trainer.records:  # the simulated allocator decides: its reserved bytes, its OOM
                run = trainer.simulated(micro_batch, usable)
                assert run is not None
                return Probe(micro_batch, run.oom is None, run.peak_reserved if run.oom is None else None,
                             usable, run.oom)
            return Probe(micro_batch, peak.tensor_peak_bytes <= usable, peak.tensor_peak_bytes, usable,
                         growing_bytes=peak.fwd_bwd_peak_bytes)

        start = solved_max(trainer, usable, config.max_micro_batch) if solving else None
        if start is not None:  # confirmed by the full method at it and the next size, at once
            trainer.need([size for size in (start, start + 1) if size <= config.max_micro_batch])
        found = search_max_micro_batch(fits, cap=config.max_micro_batch, start=start)
        confirmed = start is not None and found.max_micro_batch == start and found.trials <= 2
        method = MaxMethod.SOLVED if confirmed else MaxMethod.SEARCHED
    at_max = None
    if found is not None and found.max_micro_batch:
        at_max = next(p.peak_bytes for p in found.probes if p.micro_batch == found.max_micro_batch)
    # every size in the probes' terms: with the allocator model, reserved bytes (where the step fits)
    asked = at.tensor_peak_bytes if simulated is None else simulated.peak_reserved if simulated.oom is None else None
    peaks = {} if asked is None else {training.micro_batch: asked}
    peaks |= {p.micro_batch: p.peak_bytes for p in (found.probes if found else ()) if p.peak_bytes is not None}
    if simulated is not None and config.memory_snapshot:
        write_snapshot(simulated.allocator, snapshot_file(config.memory_snapshot, entry.name, len(config.optimizers)))
    device_bytes = (simulated.peak_reserved if simulated is not None else at.tensor_peak_bytes) + config.reserve_bytes
    times: dict[str, Any] = {}
    if trainer.times:
        times = _time_fields(trainer, training.micro_batch, config, training)
        if found is not None and found.max_micro_batch:
            times |= _time_fields(trainer, found.max_micro_batch, config, training, "_at_max")
    return dataclasses.replace(
        _base_row(entry, config, training),
        state_bytes=trainer.state_bytes,
        predicted_peak_bytes=at.tensor_peak_bytes,
        predicted_allocated_bytes=None if simulated is None else simulated.peak_allocated,
        predicted_reserved_bytes=None if simulated is None else simulated.peak_reserved,
        predicted_reserved_minus_allocated_bytes=None if simulated is None
        else simulated.peak_reserved - simulated.peak_allocated,
        predicted_cached_free_at_reserved_peak_bytes=None if simulated is None
        else simulated.cached_free_at_reserved_peak,
        predicted_oom=None if simulated is None else simulated.oom,
        predicted_device_bytes=device_bytes,
        predicted_breakdown=at.breakdown,
        predicted_max_micro_batch=None if found is None else found.max_micro_batch,
        predicted_max_capped=None if found is None else found.capped,
        trials=None if found is None else found.trials,
        predicted_max_method=method,
        predicted_peak_at_max_bytes=at_max,
        predicted_peaks=dict(sorted(peaks.items())),
        **times,
    )


def layer_periodic_applies(config: PredictConfig, training: TrainingSettings) -> bool:
    """Whether predict traces shallow copies and writes the whole model's trace from them (`shallow_step`): a row
    read from traces alone needs the allocator model (a CUDA target), time from the catalog if any (`--gpu local`
    times each op of a traced step), no QLoRA (its weight saving lowers MemTracker's peak, not the trace), and forks."""
    return (not config.full_model and config.layers is None and config.alloc_conf is not None
            and config.gpu != LOCAL and not config.model.setup.qlora and training.device == DeviceKind.CUDA
            and can_branch())


# predict writes the model's trace from copies only where they hold at most this share of its layers: each round of
# rows traces two copies and learns the trace from them (about 8 s for Llama-2-7B over 2 ranks, half the 17 s of
# tracing its 32 layers), which costs about as much as the whole model where the copies hold more
COPIES_AT_MOST = 0.25


def _micro_batches_in_order(sizes: set[int]) -> list[int]:
    """The sizes to trace, 2 and up first: the larger copy is traced at the first, the others written from the
    smaller copy's (`shallow_step._completed`), which micro-batch 1 (a path of its own) refuses."""
    return sorted(sizes, key=lambda size: (size < 2, size))


def _predict_periodic(config: PredictConfig, entries: list[OptimizerEntry], training: TrainingSettings,
                      progress: Callable[[str], None], on_row: Callable[[int, PredictRow], None]) -> list[int]:
    """Every entry from traces of the whole model written from shallow copies (layer-periodic tracing), in rounds as
    `_predict_shared` runs them: each round traces the copies at the micro-batches the rows still need, for every
    optimizer at once (`copy_traces`); then each optimizer's whole-model traces are written and its row computed in a
    forked worker of its own (`_periodic_row`: only the row comes back). Returns the positions it did not report:
    every one where the layers do not repeat or the copies do not write the model, and any whose copy's step failed
    (the whole model's may not): the full method then runs them."""
    started = time.perf_counter()
    copies = shallow_copies(config)
    if isinstance(copies, str) or copies.large > COPIES_AT_MOST * copies.blocks:
        return list(range(len(entries)))
    method = layer_periodic_method(copies)
    small: list[dict[int, AllocationTrace]] = [{} for _ in entries]
    large: list[dict[int, AllocationTrace]] = [{} for _ in entries]

    def rows_of(positions: list[int]) -> list[PredictRow | list[int] | str]:
        def one(index: int, here: bool) -> PredictRow | list[int] | str:
            position = positions[index]
            return _periodic_row(config, entries[position], training, small[position], large[position], copies)

        def died(index: int) -> PredictRow:
            return dataclasses.replace(_base_row(entries[positions[index]], config, training), status=Status.FAILED,
                                       reason=DIED)

        traced_any = any(small[position] for position in positions)  # before the first round: the sizes, here
        return run_each(one, len(positions), config.jobs if traced_any else 1, died)

    remaining, whole = list(range(len(entries))), list[int]()
    while remaining:
        found = rows_of(remaining)
        if any(isinstance(result, str) for result in found):  # the copies do not write the model
            return sorted(remaining + whole)
        wanted: dict[int, list[int]] = {}
        for position, result in zip(remaining, found, strict=True):
            if isinstance(result, PredictRow):
                on_row(position, dataclasses.replace(result, trace_method=method,
                                                     predict_s=time.perf_counter() - started))
            elif isinstance(result, list):
                wanted[position] = result
        remaining = sorted(wanted)
        if not remaining:
            break
        sizes = _micro_batches_in_order({size for needed in wanted.values() for size in needed})
        progress(f"tracing copies of {copies.small} and {copies.large} layers at micro-batch "
                 + ", ".join(map(str, sorted(sizes))))
        one_small, one_large = copy_traces(config, [entries[p] for p in remaining], training, sizes, copies,
                                           config.jobs)
        for position, traces, deeper in zip(list(remaining), one_small, one_large, strict=True):
            if isinstance(traces, StepFailed) or isinstance(deeper, StepFailed):
                remaining.remove(position)
                whole.append(position)
            else:
                small[position].update(traces)
                large[position].update(deeper)
    return sorted(whole)


def _periodic_row(config: PredictConfig, entry: OptimizerEntry, training: TrainingSettings,
                  small: dict[int, AllocationTrace], large: dict[int, AllocationTrace], copies: Shallow
                  ) -> PredictRow | list[int] | str:
    """One optimizer's row from its copies' traces at the micro-batches traced so far (its whole-model traces written
    from them), or the micro-batches it still needs, or why the copies do not write the model."""
    try:
        written = written_traces(small, large, copies, sorted(small))
    except NotPeriodic as exc:
        return str(exc)
    try:
        return _traced_row(PeriodicView(config, written), config, entry, training, lambda text: None)
    except NeedTrace as need:
        return list(need.micro_batches)
    except Exception as exc:
        failed = classified(exc, entry, config, None)[0]
        return dataclasses.replace(_base_row(entry, config, training), status=failed.status, reason=failed.reason)


def _predict_shared(config: PredictConfig, entries: list[OptimizerEntry], training: TrainingSettings,
                    progress: Callable[[str], None], on_row: Callable[[int, PredictRow], None]) -> list[int]:
    """Every entry over one fake model, one forward and backward per micro-batch for all (fake_step.SharedTrainer),
    in rounds: each optimizer's row is computed until it needs a micro-batch not traced yet; the round traces
    those, at once. Rows go to on_row by position in `entries`; returns the positions that need their own step
    (they change backward), or every one not reported where the model itself failed (the full method then shows
    it)."""
    started = time.perf_counter()
    scalars: PlaceholderScalars | None = None

    def classify(entry: OptimizerEntry, exc: BaseException) -> StepFailed:
        return classified(exc, entry, config, scalars)[0]

    def failed_row(position: int, failed: StepFailed) -> PredictRow:
        return dataclasses.replace(_base_row(entries[position], config, training), status=failed.status,
                                   reason=failed.reason, predict_s=time.perf_counter() - started)

    reported: set[int] = set()

    def report(position: int, row: PredictRow) -> None:
        reported.add(position)
        on_row(position, row)

    try:
        with fake_run(config, training) as (mesh, scalars):
            progress(f"building the fake model and warming up {len(entries)} optimizers")
            trainer = SharedTrainer(config, entries, training, mesh, config.jobs, classify)
            for position, failed in trainer.failed.items():
                report(position, failed_row(position, failed))
            remaining = {position: SharedView(trainer, position) for position in trainer.optimizers}
            while remaining:
                wanted: dict[int, list[int]] = {}
                for position, view in list(remaining.items()):
                    try:
                        row = _traced_row(view, config, entries[position], training, lambda text: None)
                    except NeedTrace as need:
                        for size in need.micro_batches:
                            wanted.setdefault(size, []).append(position)
                        continue
                    except StepFailure as failure:
                        row = failed_row(position, failure.failed)
                    except Exception as exc:
                        row = failed_row(position, classify(entries[position], exc))
                    report(position, dataclasses.replace(row, predict_s=time.perf_counter() - started))
                    del remaining[position]
                if wanted:
                    progress("tracing micro-batch " + ", ".join(f"{size} ({len(wanted[size])} optimizers)"
                                                                for size in sorted(wanted)))
                    trainer.trace_all(wanted)
    except Exception:  # the fake model failed to build or to warm up: each optimizer on its own shows why
        return [position for position in range(len(entries)) if position not in reported]
    return trainer.own_step


def predict_rows(config: PredictConfig, entries: list[OptimizerEntry], training: TrainingSettings,
                 on_progress: Callable[[str, str], None] = lambda name, text: None,
                 on_row: Callable[[PredictRow], None] = lambda row: None) -> list[PredictRow]:
    """One row per entry, in order: the available ones over one shared fake model where the platform can fork,
    the rest (those that change backward) each by the full method, in forked workers with jobs > 1 (a fake step
    is Python-bound and each optimizer's is independent; nothing here has started CUDA)."""
    rows: dict[int, PredictRow] = {}

    def found(position: int, row: PredictRow) -> None:
        rows[position] = row
        on_row(row)

    for position, entry in enumerate(entries):
        reason = availability(entry)
        if reason is not None:
            found(position, dataclasses.replace(_base_row(entry, config, training), status=Status.UNAVAILABLE,
                                                reason=reason))
    own = [position for position in range(len(entries)) if position not in rows]
    if own and layer_periodic_applies(config, training):
        periodic = own
        names = ", ".join(entries[position].name for position in periodic)
        own = [periodic[i] for i in _predict_periodic(
            config, [entries[position] for position in periodic], training,
            lambda text: on_progress(names, text), lambda i, row: found(periodic[i], row))]
    if own and can_branch():
        shared = own
        names = ", ".join(entries[position].name for position in shared)
        own = [shared[i] for i in _predict_shared(
            config, [entries[position] for position in shared], training,
            lambda text: on_progress(names, text), lambda i, row: found(shared[i], row))]

    def predicted(index: int, here: bool) -> PredictRow:
        entry = entries[own[index]]
        progress = functools.partial(on_progress, entry.name) if here else lambda text: None
        return predict_optimizer(config, entry, training, progress)

    jobs = min(config.jobs, len(own))
    for position in own if jobs > 1 else ():
        on_progress(entries[position].name, f"predicting, {jobs} optimizers at once")
    for index, row in enumerate(run_each(
            predicted, len(own), config.jobs, on_result=lambda i, row: on_row(row),
            died=lambda i: dataclasses.replace(_base_row(entries[own[i]], config, training), status=Status.FAILED,
                                               reason=DIED))):
        rows[own[index]] = row
    return [rows[position] for position in range(len(entries))]


TIME_BAND = 0.25  # what the method can claim without calibration: see docs/methods.md, "Step time"


def with_mfu(row: PredictRow, flops_per_token: float, config: PredictConfig) -> PredictRow:
    """MFU as torchtitan computes it: model FLOPs per token x tokens/s per GPU / the GPU's dense bf16 peak (none for
    --gpu local, whose peak is unknown)."""
    target = time_target(config)
    if target is None or row.status != Status.OK:
        return row
    peak = target.gpu.peak("bf16")

    def mfu(per_gpu: float | None) -> float | None:
        return None if per_gpu is None else flops_per_token * per_gpu / peak

    return dataclasses.replace(row, predicted_mfu=mfu(row.predicted_tokens_per_s_per_gpu),
                               predicted_mfu_at_max=mfu(row.predicted_tokens_per_s_per_gpu_at_max))


def timing_notes(config: PredictConfig, training: TrainingSettings, flops_per_token: float) -> tuple[str, ...]:
    """How the time figures were made, for the report's notes."""
    target = time_target(config)
    ranks = config.gpus * config.replicas
    if target is None:
        collectives = ("gloo's collectives timed on spawned local ranks, on the compute engine (they share its "
                       "cores)" if training.device == DeviceKind.CPU else "collectives not timed (one device here)")
        where = (f"op times measured on this machine's {training.device} (each distinct op of the traced step, the "
                 f"fastest of several runs on made-up values; cached per device and torch version); {collectives}")
    else:
        gpu = target.gpu
        where = (f"{target.describe(ranks)}: each op of the traced step costed by roofline on the {gpu.name} "
                 f"({gpu.peak('bf16') / 1e12:.0f} TFLOP/s bf16 dense, {gpu.memory_bandwidth / 1e9:,.0f} GB/s, "
                 f"matmul efficiency {gpu.matmul_efficiency:.0%} with tile and wave quantization over {gpu.sms} SMs, "
                 f"attention {gpu.attention_efficiency:.0%}, memory {gpu.memory_efficiency:.0%}, "
                 f"{gpu.launch_s * 1e6:.1f} us per launch), collectives by ring time over NCCL's bus bandwidth "
                 f"({gpu.intra_node_busbw / 1e9:.0f} GB/s in a node"
                 + (f", {target.network.busbw / 1e9:.0f} GB/s per GPU across nodes" if ranks > target.gpus_per_node
                    else "") + "); sources: optprof/hardware/catalog.toml")
    notes = [f"time (predicted, about ±{TIME_BAND:.0%}): {where}; ops placed on their streams in the order the step "
             "issued them, so overlap and exposed communication come from the timeline"]
    if ranks > 1 and config.replicas > 1:
        notes.append("time: the recipe's DDP all-reduce is not in the traced step (one rank was predicted): its "
                     "communication is not counted")
    notes.append(f"MFU: {flops_per_token / 1e9:.2f} GFLOP per token (6 x matmul weights + 12 x layers x heads x "
                 "head dim x seq len, as torchtitan's get_num_flop_per_token) x tokens/s per GPU / dense bf16 peak")
    return tuple(notes)


def run_predict(config: PredictConfig, on_progress: Callable[[str, str], None] | None = None,
                on_row: Callable[[PredictRow], None] | None = None) -> PredictReport:
    check_training(config.training, config.model.dtype)
    entries = resolve_optimizers(list(config.optimizers))
    check_opt_args(entries, config.opt_args)
    selection = config.model
    loaded = load_selection(selection)
    info = loaded.info
    training = dataclasses.replace(config.training, seq_len=resolve_seq_len(
        config.training.seq_len, info.max_position_embeddings, config.training.device))
    untrained = untrained_in(selection, training.seq_len or 1, loaded.module)  # no gradient, from this meta build
    if layer_periodic_applies(config, training):
        model_period(selection, loaded)  # the layer pattern, from this meta build (not a second one)
    finished: FinishedRows[PredictRow] = FinishedRows(on_row)
    interrupted: str | None = None
    try:
        rows = predict_rows(config, entries, training, on_progress or (lambda name, text: None), finished)
    except Interrupted as stop:  # keep the rows that finished; stop the workers before anything is written
        stop_children()
        interrupted = str(stop)
        rows = finished.or_interrupted((_base_row(e, config, training) for e in entries), interrupted)
    time_notes: tuple[str, ...] = ()
    if config.gpu is not None:
        flops_per_token = model_flops_per_token(loaded.module, info, training.seq_len or 0)
        rows = [with_mfu(row, flops_per_token, config) for row in rows]
        time_notes = timing_notes(config, training, flops_per_token)
    assumptions = ASSUMPTIONS_COMMON + (ASSUMPTIONS_CUDA if training.device == DeviceKind.CUDA else ())
    dropout = config_values(loaded.config, ATTENTION_DROPOUT_KEYS) if training.device == DeviceKind.CUDA else {}
    zeroed = [f"{key} {value:g}" for key, value in dropout.items() if value]  # only where there was dropout
    if zeroed:
        assumptions += (f"attention dropout ({', '.join(zeroed)}) was set to 0 so that SDPA takes the "
                        "flash-style path, whose memory matches CUDA's flash / memory-efficient kernels",)
    if config.model.setup.qlora:
        assumptions += (QLORA_PREDICTED,)
    if info.num_experts:
        assumptions += (f"mixture of experts ({info.num_experts} experts, {info.experts_per_token} per token): the "
                        "experts run as transformers' grouped experts path (its default), whose tensors have "
                        "tokens x top-k rows however the tokens are routed, so the prediction holds for any "
                        "routing, balanced or not (compare reports the routing it saw); an implementation with a "
                        "capacity per expert (padding or dropping tokens) would differ",)
    untrained_line = untrained_note(untrained, training.seq_len or 1)
    if untrained_line is not None:
        assumptions += (untrained_line,)
    assumptions += recipe_notes(training, selection, config.replicas)
    outside = allocator_notes(config)
    assumptions += tuple(line for _, line in outside)
    assumptions += time_notes
    for method in dict.fromkeys(row.trace_method for row in rows if row.trace_method):
        assumptions += (f"{method}; the tensor peak and its breakdown read from the written trace (the live bytes of "
                        "its allocations at their peak, MemTracker's peak to the byte; --full-model traces the whole "
                        "model)",)
    if config.gpus == 1 and training.mp_param is not None:
        assumptions += ("--mp-policy on one device: FSDP2 over a one-rank mesh (as torchtitan runs one GPU), so "
                        "forward and backward use gathered copies in the policy's dtype",)
    if config.gpus > 1:
        groups = config.shard_size or config.gpus
        kept = {Strategy.ZERO2: " with parameters kept gathered after forward (zero2)",
                Strategy.HSDP: f" sharded in groups of {groups} ranks, replicated across them (hsdp)",
                }.get(config.strategy, "")
        assumptions += (f"FSDP2{kept} over {config.gpus} ranks ran in one process on a fake process group (no "
                        "communication); the figures are per rank, for rank 0, and every rank holds the same shapes",)
    return PredictReport(
        model=info,
        results=tuple(rows),
        interrupted=interrupted,
        config={
            **command_config("predict", selection, [e.name for e in entries], config.opt_args),
            **dataclasses.asdict(training),
            **step_record(selection.dtype, training, config.gpus > 1 or training.mp_param is not None,
                          config.gpus > 1 or training.mp_param is not None, config.opt_args),
            "target_device": training.device,
            "gpu_memory_bytes": config.gpu_memory_bytes,
            "reserve_bytes": config.reserve_bytes,
            "max_micro_batch": config.max_micro_batch,
            "gpus": config.gpus,
            "strategy": config.strategy if config.gpus > 1 else None,
            "shard_size": config.shard_size,
            "replicas": config.replicas,
            "alloc_conf": config.alloc_conf,
            "outside_allocator": [cost for cost, _ in outside if cost is not None],
            "gpu": config.gpu,
            "network": config.network,
            "gpus_per_node": config.gpus_per_node,
        },
        assumptions=assumptions,
    )
