"""`optprof predict`: the training step on fake tensors under torch's MemTracker, without a GPU.

FakeTensorMode gives every tensor its shape, dtype and storage size but no memory, so the same code that
`compare` runs (the model's forward and backward, the real optimizer's step, MemTracker) runs here for a
7B model on a laptop. What fake CPU tensors cannot see is listed in the report's `assumptions`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any

from optprof.commands.micro_batch import search_max_micro_batch
from optprof.config import (
    SHARDED_STRATEGIES,
    DeviceKind,
    ModelSelection,
    PredictConfig,
    Strategy,
    TrainingSettings,
    check_training,
    parameter_dtype,
    resolve_seq_len,
    step_record,
)
from optprof.device.allocator import AllocatorConfig
from optprof.device.costs import cublas_workspace_bytes, rank_costs
from optprof.device.replay import Replay, replay
from optprof.device.snapshot import write_snapshot
from optprof.device.trace import AllocationTrace, TraceRecorder
from optprof.distributed.sharding import (
    adam_mini_on_cpu_ranks,
    fake_process_group,
    fake_tensors,
    gloo_reduce_scatter_copies,
    shard_fsdp,
    zero1_optimizer,
)
from optprof.errors import error_text
from optprof.measure.device import CpuDevice
from optprof.measure.step import TrainStep, configure_model, make_batches
from optprof.measure.tracker import TrackedPeak, tracked_step
from optprof.model.info import config_values, trainable_parameters
from optprof.model.loading import default_loaded_dtype, load_config, load_selection
from optprof.model.setups import QLORA_PREDICTED, qlora_weight_saving
from optprof.optimizers.outcome import status_of
from optprof.optimizers.registry import OptimizerEntry, availability, check_opt_args, resolve_optimizers
from optprof.optimizers.state import PlaceholderScalars, account_state
from optprof.processes.forked import run_each
from optprof.results.reports import PredictReport, command_config
from optprof.results.rows import PredictRow, Probe
from optprof.results.vocab import Status
from optprof.trainers import RECIPES

SM90 = 9  # the compute capability the model's cuBLAS workspace assumes (H100, H200): 32 MiB per thread and stream

# Attention dropout makes CPU SDPA fall back to a kernel that keeps the whole attention matrix; CUDA's
# flash and memory-efficient kernels do not, so for a CUDA target it is switched off (memory only).
ATTENTION_DROPOUT_KEYS = ("attention_dropout", "attn_pdrop", "attention_probs_dropout_prob")

# Why a fake step can fail where a real one runs: the model read integers back to Python (an MoE layer's
# tokens per expert, to split its input), and fake tensors have no values to give it.
DATA_DEPENDENT = ("the model reads tensor values back to Python (e.g. tokens per expert, to split its input), "
                  "which a step on fake tensors cannot know; compare measures it. The fake step failed with: ")

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
    --reserve that replaced them), as (the report's record, the assumption's line)."""
    if config.alloc_conf is None:
        return []
    lines: list[tuple[dict[str, Any] | None, str]] = [(None, (
        "reserved bytes: the tracked step's allocations and frees, with their streams (FSDP2's all-gather and "
        "reduce-scatter buffers on their own), replayed twice through a model of torch 2.13's CUDACachingAllocator "
        f"(PYTORCH_CUDA_ALLOC_CONF {config.alloc_conf}); cuBLAS's 32 MiB workspace (sm90) allocated through it for "
        "the forward and the backward thread; the largest micro-batch is the largest whose replay does not run out "
        "of memory"))]
    costs = rank_costs(config.strategy, config.gpus, config.shard_size)
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


def no_overflow_scaler() -> Any:
    """fp16's GradScaler on the path of a step without overflow. On fake tensors `found_inf.item()` reads a
    placeholder (non-zero), which would make the scaler skip optimizer.step(), and with it the optimizer's
    state and the step's temporaries: a prediction 57 MB low with no state on the demo model."""
    from torch.amp import GradScaler

    class NoOverflowScaler(GradScaler):
        def _maybe_opt_step(self, optimizer: Any, optimizer_state: Any, *args: Any, **kwargs: Any) -> Any:
            return optimizer.step(*args, **kwargs)

    return NoOverflowScaler("cpu")


def _base_row(entry: OptimizerEntry, config: PredictConfig, training: TrainingSettings) -> PredictRow:
    return PredictRow(**entry.row_head(config.opt_args), status=Status.OK, micro_batch=training.micro_batch,
                      seq_len=training.seq_len, grad_accum=training.grad_accum, world_size=config.gpus)


class FakeTrainer:
    """One optimizer over a fake model: warmed up once (lazy state), then a tracked step per micro-batch."""

    def __init__(self, config: PredictConfig, entry: OptimizerEntry, training: TrainingSettings,
                 mesh: Any = None) -> None:
        import torch

        self.training = training
        overrides = dict.fromkeys(ATTENTION_DROPOUT_KEYS, 0.0) if training.device == DeviceKind.CUDA else {}
        torch.manual_seed(training.seed)
        setup = config.model.setup
        selection = dataclasses.replace(config.model, setup=dataclasses.replace(setup, qlora=False))  # see below
        loaded = load_selection(selection, dtype=parameter_dtype(config.model, training), device="cpu",
                                overrides=overrides, layers=config.layers)
        self.model, self.info = loaded.module, loaded.info
        # QLoRA: fake tensors cannot hold bitsandbytes' 4-bit weights, so the step runs on the unquantized base
        # and every peak is lowered by what NF4 storage saves (measured per shape: setups.qlora_weight_saving)
        self.parameter_saving = qlora_weight_saving(self.model) if setup.qlora else 0
        self.model.train()
        configure_model(self.model, training)
        self.mesh = mesh
        if mesh is not None and config.strategy in SHARDED_STRATEGIES:
            shard_fsdp(self.model, mesh, config.strategy, training=training)
        self.params = trainable_parameters(self.model)

        def build() -> Any:
            return entry.build(self.model, self.info, config.opt_args)

        # zero1 (support checks only): the optimizer as rank 0's share, the model unwrapped (no DDP buckets)
        self.optimizer = zero1_optimizer(build) if mesh is not None and config.strategy == Strategy.ZERO1 else build()
        self._peaks: dict[int, TrackedPeak] = {}  # by micro-batch
        self._traces: dict[int, AllocationTrace] = {}  # by micro-batch, with the allocator model
        self._replays: dict[tuple[int, int | None], Replay] = {}  # by micro-batch and capacity
        self.records = config.alloc_conf is not None
        self.alloc_conf = config.alloc_conf or ""
        self.snapshots = bool(config.memory_snapshot)  # the replays keep their events for the snapshot
        self._step(1).run()  # Adam-style state appears in the first step
        self.state_bytes = account_state(self.optimizer, self.params, entry.second_moment_keys).state_bytes

    def _step(self, micro_batch: int) -> TrainStep:
        # CPU kernels on fake tensors; device-side settings (amp dtype) still follow the target
        training = dataclasses.replace(self.training, micro_batch=micro_batch, device=DeviceKind.CPU)
        batches = make_batches(self.info.vocab_size, training, "cpu")
        scaler = no_overflow_scaler() if training.amp == "fp16" else None
        return TrainStep(self.model, self.optimizer, self.params, batches, CpuDevice(), training, scaler)

    def peak(self, micro_batch: int) -> TrackedPeak:
        """The tracked step's peak (FSDPMemTracker when sharded), traced once per micro-batch: a step on fake
        tensors is deterministic, and the search probes the asked size again."""
        if micro_batch not in self._peaks:
            recorder = TraceRecorder(cublas_workspace_bytes(SM90)) if self.records else None
            self._peaks[micro_batch] = _lowered(tracked_step(self._step(micro_batch), self.state_bytes, recorder),
                                                self.parameter_saving)
            if recorder is not None:
                self._traces[micro_batch] = recorder.trace
        return self._peaks[micro_batch]

    def trace(self, micro_batch: int) -> AllocationTrace:
        """The allocation trace of the tracked step at `micro_batch` (with the allocator model only)."""
        self.peak(micro_batch)
        return self._traces[micro_batch]

    def simulated(self, micro_batch: int, capacity: int | None) -> Replay | None:
        """The step at `micro_batch` replayed through the caching-allocator model (CUDA targets), on a card whose
        allocator may take `capacity` bytes (None: unlimited), once per size; None without the model."""
        if not self.records:
            return None
        if (micro_batch, capacity) not in self._replays:
            self._replays[(micro_batch, capacity)] = replay(
                self.trace(micro_batch), AllocatorConfig.parse(self.alloc_conf), capacity, record=self.snapshots)
        return self._replays[(micro_batch, capacity)]


def snapshot_file(target: str, optimizer: str, optimizers: int) -> str:
    """One file per optimizer when several are predicted: NAME.pickle -> NAME-adamw.pickle."""
    if optimizers == 1:
        return target
    stem, dot, suffix = target.rpartition(".")
    return f"{stem}-{optimizer}.{suffix}" if dot else f"{target}-{optimizer}"


def _lowered(peak: TrackedPeak, saving: int) -> TrackedPeak:
    """The peak with `saving` bytes fewer parameters (alive throughout the step, so in every phase's peak)."""
    if not saving:
        return peak
    breakdown = {**peak.breakdown, "parameters": peak.breakdown.get("parameters", 0) - saving}
    return dataclasses.replace(peak, tensor_peak_bytes=peak.tensor_peak_bytes - saving, breakdown=breakdown,
                               fwd_bwd_peak_bytes=peak.fwd_bwd_peak_bytes - saving)


def predict_optimizer(config: PredictConfig, entry: OptimizerEntry, training: TrainingSettings,
                      progress: Callable[[str], None]) -> PredictRow:
    """The entry's predicted peak at the micro-batch asked for, and its largest micro-batch when memory is given."""
    return predict_outcome(config, entry, training, progress)[0]


def predict_outcome(config: PredictConfig, entry: OptimizerEntry, training: TrainingSettings,
                    progress: Callable[[str], None]) -> tuple[PredictRow, bool]:
    """`predict_optimizer`'s row, and whether the fake step failed because the model read tensor values (fake
    tensors have none to give it; a real step may well run: preflight leaves that undecided)."""
    started = time.perf_counter()
    base = _base_row(entry, config, training)
    reason = availability(entry)
    if reason is not None:
        return dataclasses.replace(base, status=Status.UNAVAILABLE, reason=reason), False
    scalars: PlaceholderScalars | None = None
    mesh = None
    try:
        with contextlib.ExitStack() as stack:
            if config.gpus > 1 or training.mp_param is not None:  # a policy is FSDP2's: one rank is a mesh too
                mesh = stack.enter_context(fake_process_group(config.gpus, config.strategy, config.shard_size))
            if config.gpus > 1 and training.device == DeviceKind.CPU:  # CPU ranks talk over gloo
                stack.enter_context(gloo_reduce_scatter_copies())
            stack.enter_context(adam_mini_on_cpu_ranks())
            scalars = stack.enter_context(fake_tensors())
            progress("building the fake model and warming up")
            trainer = FakeTrainer(config, entry, training, mesh)
            progress(f"micro-batch {training.micro_batch}")
            at = trainer.peak(training.micro_batch)
            usable = None if config.gpu_memory_bytes is None else config.gpu_memory_bytes - config.reserve_bytes
            simulated = trainer.simulated(training.micro_batch, usable)
            found = None
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

                found = search_max_micro_batch(fits, cap=config.max_micro_batch)
    except Exception as exc:
        status, reason = status_of(exc, entry, config.gpus, config.strategy)
        values_read = status == Status.FAILED and scalars is not None and bool(scalars.integer_reads)
        if values_read:
            status, reason = Status.UNSUPPORTED, DATA_DEPENDENT + error_text(exc)
        return dataclasses.replace(base, status=status, reason=reason, predict_s=time.perf_counter() - started), \
            values_read
    at_max = None
    if found is not None and found.max_micro_batch:
        at_max = next(p.peak_bytes for p in found.probes if p.micro_batch == found.max_micro_batch)
    peaks = {training.micro_batch: at.tensor_peak_bytes}
    peaks |= {p.micro_batch: p.peak_bytes for p in (found.probes if found else ()) if p.peak_bytes is not None}
    if simulated is not None and config.memory_snapshot:
        write_snapshot(simulated.allocator, snapshot_file(config.memory_snapshot, entry.name, len(config.optimizers)))
    device_bytes = (simulated.peak_reserved if simulated is not None else at.tensor_peak_bytes) + config.reserve_bytes
    return dataclasses.replace(
        base,
        state_bytes=trainer.state_bytes,
        predicted_peak_bytes=at.tensor_peak_bytes,
        predicted_allocated_bytes=None if simulated is None else simulated.peak_allocated,
        predicted_reserved_bytes=None if simulated is None else simulated.peak_reserved,
        predicted_fragmentation_bytes=None if simulated is None else simulated.fragmentation,
        predicted_oom=None if simulated is None else simulated.oom,
        predicted_device_bytes=device_bytes,
        predicted_breakdown=at.breakdown,
        predicted_max_micro_batch=None if found is None else found.max_micro_batch,
        predicted_max_capped=None if found is None else found.capped,
        trials=None if found is None else found.trials,
        predicted_peak_at_max_bytes=at_max,
        predicted_peaks=dict(sorted(peaks.items())),
        predict_s=time.perf_counter() - started,
    ), False


def _predict_all(config: PredictConfig, entries: list[OptimizerEntry], training: TrainingSettings,
                 on_progress: Callable[[str, str], None], on_row: Callable[[PredictRow], None]) -> list[PredictRow]:
    """One row per entry, in order. A fake step is Python-bound and each optimizer's is independent, so with
    jobs > 1 they run at once in forked workers (nothing here has started CUDA: fake tensors are CPU tensors)."""
    def predicted(index: int, here: bool) -> PredictRow:
        entry = entries[index]
        progress = functools.partial(on_progress, entry.name) if here else lambda text: None
        return predict_optimizer(config, entry, training, progress)

    jobs = min(config.jobs, len(entries))
    for entry in entries if jobs > 1 else ():
        on_progress(entry.name, f"predicting, {jobs} optimizers at once")

    died = "the predicting process died (crash or out of memory); retry with --jobs 1 to see the error"
    return run_each(predicted, len(entries), config.jobs, on_result=lambda i, row: on_row(row),
                    died=lambda i: dataclasses.replace(_base_row(entries[i], config, training), status=Status.FAILED,
                                                       reason=died))


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
    rows = _predict_all(config, entries, training, on_progress or (lambda name, text: None),
                        on_row or (lambda row: None))
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
    assumptions += recipe_notes(training, selection, config.replicas)
    outside = allocator_notes(config)
    assumptions += tuple(line for _, line in outside)
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
        config={
            **command_config("predict", selection, [e.name for e in entries], config.opt_args),
            **dataclasses.asdict(training),
            **step_record(selection.dtype, training, config.gpus > 1 or training.mp_param is not None,
                          config.gpus > 1 or training.mp_param is not None),
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
        },
        assumptions=assumptions,
    )
