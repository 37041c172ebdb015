"""The training step on fake tensors, as predict runs it: the fake model, and two ways to trace its steps.

- `FakeTrainer`: one optimizer over its own fake model, warmed up with a full step, then a tracked step per
  micro-batch (the full method; every optimizer can run it).
- `SharedTrainer`: every optimizer over one fake model. Forward and backward do the same work whatever the
  optimizer (its state is alive throughout, unchanged until its own step), so each micro-batch's tracked step runs
  forward and backward once, without any optimizer, and forks after backward: each child joins one optimizer (its
  state registered with the trackers and spliced into the allocation trace, `TensorPeakTracker.join`,
  `TraceRecorder.finished_trace`) and runs that optimizer's step. The figures equal the full method's to the byte
  (tests/integration/test_shared_step.py runs every registered optimizer both ways). Optimizers that change backward
  itself (LOMO's update inside it, SophiaH's gradient graph, any that hooks the parameters) keep their own step.
  `SharedTrainer.spliced` (plan's copies) runs forward and backward in the process itself and forks each
  optimizer's step only once: later steps take that step's part of the trace (`TraceRecorder.with_part`).

Fake tensors have no memory, so a fork costs little, and the children of one micro-batch run at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from optprof.config import SHARDED_STRATEGIES, DeviceKind, PredictConfig, Strategy, TrainingSettings, parameter_dtype
from optprof.device.alloc_conf import AllocatorConfig
from optprof.device.costs import SM90_WORKSPACE_BYTES
from optprof.device.replay import Replay, replay
from optprof.device.trace import AllocationTrace, OptimizerPart, RecordingPoint, TraceRecorder
from optprof.distributed.sharding import (
    adam_mini_on_cpu_ranks,
    fake_process_group,
    fake_tensors,
    gloo_reduce_scatter_copies,
    shard_fsdp,
    zero1_optimizer,
)
from optprof.errors import error_text
from optprof.hardware.catalog import LOCAL, target_gpu
from optprof.measure.device import CpuDevice
from optprof.measure.step import TrainStep, configure_model, make_batches
from optprof.measure.tracker import TensorPeakTracker, TrackedPeak, recorded_step, tracked_step
from optprof.model.info import trainable_parameters
from optprof.model.loading import load_selection
from optprof.model.setups import qlora_weight_saving
from optprof.optimizers.implementation import set_implementation
from optprof.optimizers.outcome import status_of
from optprof.optimizers.registry import OptimizerEntry
from optprof.optimizers.state import (
    PlaceholderScalars,
    account_state,
    fused_update,
    needs_gradient_graph,
    state_tensors,
)
from optprof.optimizers.trained import names_found, plain_name, untrained_in
from optprof.processes.branching import run_branched
from optprof.results.vocab import Status

# Attention dropout makes CPU SDPA fall back to a kernel that keeps the whole attention matrix; CUDA's
# flash and memory-efficient kernels do not, so for a CUDA target it is switched off (memory only).
ATTENTION_DROPOUT_KEYS = ("attention_dropout", "attn_pdrop", "attention_probs_dropout_prob")

# Why a fake step can fail where a real one runs: the model read integers back to Python (an MoE layer's
# tokens per expert, to split its input), and fake tensors have no values to give it.
DATA_DEPENDENT = ("the model reads tensor values back to Python (e.g. tokens per expert, to split its input), "
                  "which a step on fake tensors cannot know; compare measures it. The fake step failed with: ")

DIED = "the predicting process died (crash or out of memory); retry with --jobs 1 to see the error"


def no_overflow_scaler() -> Any:
    """fp16's GradScaler on the path of a step without overflow. On fake tensors `found_inf.item()` reads a
    placeholder (non-zero), which would make the scaler skip optimizer.step(), and with it the optimizer's
    state and the step's temporaries: a prediction 57 MB low with no state on the demo model."""
    from torch.amp import GradScaler

    class NoOverflowScaler(GradScaler):
        def _maybe_opt_step(self, optimizer: Any, optimizer_state: Any, *args: Any, **kwargs: Any) -> Any:
            return optimizer.step(*args, **kwargs)

    return NoOverflowScaler("cpu")


def lowered(peak: TrackedPeak, saving: int) -> TrackedPeak:
    """The peak with `saving` bytes fewer parameters (alive throughout the step, so in every phase's peak)."""
    if not saving:
        return peak
    breakdown = {**peak.breakdown, "parameters": peak.breakdown.get("parameters", 0) - saving}
    return dataclasses.replace(peak, tensor_peak_bytes=peak.tensor_peak_bytes - saving, breakdown=breakdown,
                               fwd_bwd_peak_bytes=peak.fwd_bwd_peak_bytes - saving)


class FakeModel:
    """The model on fake tensors as the step runs it: loaded, its checkpointing and loss set, sharded over `mesh`."""

    def __init__(self, config: PredictConfig, training: TrainingSettings, mesh: Any = None) -> None:
        import torch

        self.config = config
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

    @contextlib.contextmanager
    def configured(self, training: TrainingSettings) -> Iterator[None]:
        """Another setup's checkpointing and loss on this model, built and warmed up without either (plan's setups
        of one strategy share their copies), for the steps inside; then the model as it was. Both replace forwards
        on the instances (measure/checkpointing.py, measure/loss.py), which FSDP2's hooks run around, sharded or
        not: those are put back."""
        from optprof.model.info import transformer_blocks

        modules = [self.model, *transformer_blocks(self.model)]
        missing = object()
        forwards = [vars(module).get("forward", missing) for module in modules]
        before, self.training = self.training, training
        try:
            configure_model(self.model, training)  # may refuse the setup part-way (SetupUnsupported)
            yield
        finally:
            self.training = before
            for module, forward in zip(modules, forwards, strict=True):
                if forward is missing:
                    vars(module).pop("forward", None)
                else:
                    module.forward = forward

    def optimizer(self, entry: OptimizerEntry) -> Any:
        def build() -> Any:
            return entry.build(self.model, self.info, self.config.opt_args)

        # zero1 (support checks only): the optimizer as rank 0's share, the model unwrapped (no DDP buckets)
        optimizer = zero1_optimizer(build) if self.mesh is not None and self.config.strategy == Strategy.ZERO1 \
            else build()
        set_implementation(optimizer, self.training.update_impl, self.training.device, self.config.opt_args,
                           fake=True)
        return optimizer

    def step(self, optimizer: Any, micro_batch: int) -> TrainStep:
        # CPU kernels on fake tensors; device-side settings (amp dtype) still follow the target
        training = dataclasses.replace(self.training, micro_batch=micro_batch, device=DeviceKind.CPU)
        batches = make_batches(self.info.vocab_size, training, "cpu")
        scaler = no_overflow_scaler() if training.amp == "fp16" else None
        step = TrainStep(self.model, optimizer, self.params, batches, CpuDevice(), training, scaler)
        if self.training.device == DeviceKind.CUDA:
            step.clip_foreach = True  # clip_grad_norm_ on CUDA tensors: _foreach_norm (torch/nn/utils/clip_grad.py)
        return step

    def recorder(self) -> TraceRecorder | None:
        """The allocation trace's recorder with the allocator model; with a time target (--gpu), it records the ops
        too, and for --gpu local what rebuilds each op for timing."""
        times = self.config.gpu is not None
        if self.config.alloc_conf is None and not times:
            return None
        gpu = target_gpu(self.config.gpu, self.config.gpu_spec)
        workspace = 0 if self.config.alloc_conf is None else \
            gpu.cublas_workspace_bytes if gpu is not None else SM90_WORKSPACE_BYTES
        return TraceRecorder(workspace, ops=times, specs=self.config.gpu == LOCAL)


@dataclass(frozen=True)
class Traced:
    """One optimizer's tracked step at one micro-batch."""

    peak: TrackedPeak | None  # None from a SharedTrainer that records the trace alone (`tensor_peak=False`)
    trace: AllocationTrace | None  # with the allocator model only


@dataclass(frozen=True)
class StepFailed:
    """An optimizer whose step (or build, or warm-up) raised: the row's status and reason, decided where it ran."""

    status: Status
    reason: str


class NeedTrace(BaseException):
    """A shared optimizer asked for a micro-batch not traced yet: the caller traces it (with any others asked for
    in the same round, at once) and asks again."""

    def __init__(self, micro_batches: list[int]) -> None:
        super().__init__(micro_batches)
        self.micro_batches = micro_batches


class StepFailure(Exception):
    """Raised by a shared optimizer's view for a micro-batch where its step failed (`StepFailed`)."""

    def __init__(self, failed: StepFailed) -> None:
        super().__init__(failed.reason)
        self.failed = failed


class Simulated:
    """The replays of a trainer's traces through the caching-allocator model, once per micro-batch and capacity."""

    records: bool
    times: bool
    snapshots: bool
    alloc_conf: str

    def __init__(self, config: PredictConfig) -> None:
        self.records = config.alloc_conf is not None
        self.times = config.gpu is not None  # the traces carry the ops, for the step's time
        self.alloc_conf = config.alloc_conf or ""
        self.total_memory = config.gpu_memory_bytes  # the card's (--gpu-memory), for the allocator's options
        self.snapshots = bool(config.memory_snapshot)  # the replays keep their events for the snapshot
        self._replays: dict[tuple[int, int | None], Replay] = {}

    def trace(self, micro_batch: int) -> AllocationTrace:
        raise NotImplementedError

    def need(self, micro_batches: list[int]) -> None:
        """The micro-batches about to be asked for, so that a shared trainer traces them in one round."""

    def simulated(self, micro_batch: int, capacity: int | None) -> Replay | None:
        """The step at `micro_batch` replayed through the caching-allocator model (CUDA targets), on a card whose
        allocator may take `capacity` bytes (None: unlimited), once per size; None without the model."""
        if not self.records:
            return None
        if (micro_batch, capacity) not in self._replays:
            self._replays[(micro_batch, capacity)] = replay(
                self.trace(micro_batch), AllocatorConfig.parse(self.alloc_conf), capacity, record=self.snapshots,
                total_memory=self.total_memory)
        return self._replays[(micro_batch, capacity)]


class FakeTrainer(Simulated):
    """One optimizer over a fake model: warmed up once (lazy state), then a tracked step per micro-batch."""

    def __init__(self, config: PredictConfig, entry: OptimizerEntry, training: TrainingSettings,
                 mesh: Any = None) -> None:
        super().__init__(config)
        self.fake = FakeModel(config, training, mesh)
        self.optimizer = self.fake.optimizer(entry)
        self._peaks: dict[int, TrackedPeak] = {}  # by micro-batch
        self._traces: dict[int, AllocationTrace] = {}  # by micro-batch, with the allocator model
        self.fake.step(self.optimizer, 1).run()  # Adam-style state appears in the first step
        self.state_bytes = account_state(self.optimizer, self.fake.params, entry.second_moment_keys).state_bytes

    def _step(self, micro_batch: int) -> TrainStep:
        return self.fake.step(self.optimizer, micro_batch)

    def peak(self, micro_batch: int) -> TrackedPeak:
        """The tracked step's peak (FSDPMemTracker when sharded), traced once per micro-batch: a step on fake
        tensors is deterministic, and the search probes the asked size again."""
        if micro_batch not in self._peaks:
            recorder = self.fake.recorder()
            self._peaks[micro_batch] = lowered(tracked_step(self._step(micro_batch), self.state_bytes, recorder),
                                               self.fake.parameter_saving)
            if recorder is not None:
                self._traces[micro_batch] = recorder.finished_trace()
        return self._peaks[micro_batch]

    def trace(self, micro_batch: int) -> AllocationTrace:
        """The allocation trace of the tracked step at `micro_batch` (with the allocator model only)."""
        self.peak(micro_batch)
        return self._traces[micro_batch]


HOOK_DICTS = ("_backward_hooks", "_post_accumulate_grad_hooks")  # a tensor's gradient hooks, by handle id


def _hook_ids(params: Iterable[Any]) -> list[set[int]]:
    """Each parameter's gradient hooks, by handle id (what an optimizer that acts inside backward registers)."""
    return [{key for name in HOOK_DICTS for key in (getattr(p, name, None) or {})} for p in params]


def _remove_hooks_since(params: list[Any], before: list[set[int]]) -> bool:
    """Remove the gradient hooks registered since `before` (what `RemovableHandle.remove` does); whether any was."""
    removed = False
    for param, kept in zip(params, before, strict=True):
        for name in HOOK_DICTS:
            hooks = getattr(param, name, None) or {}
            for key in [key for key in hooks if key not in kept]:
                del hooks[key]
                removed = True
    return removed


Classify = Callable[[OptimizerEntry, BaseException], StepFailed]


class SharedTrainer:
    """Every optimizer of `entries` over one fake model, one forward and backward per micro-batch for all of them.

    Built: the model once; each optimizer, warmed up by its first step (where its state appears, as in the full
    method). `failed` holds the optimizers that failed so far, `own_step` those that change backward (run them with
    `FakeTrainer`). `trace_all` traces micro-batches, each for the optimizers that asked for it; `outcome` reads
    what came back. With `tensor_peak=False` a step with an allocation trace is recorded without MemTracker:
    `Traced.peak` is None (for callers that read only traces)."""

    def __init__(self, config: PredictConfig, entries: list[OptimizerEntry], training: TrainingSettings,
                 mesh: Any, jobs: int, classify: Classify, tensor_peak: bool = True) -> None:
        self.config = config
        self.tensor_peak = tensor_peak
        self.entries = entries
        self.jobs = jobs
        self.classify = classify
        self.fake = FakeModel(config, training, mesh)
        self.failed: dict[int, StepFailed] = {}
        self.own_step: list[int] = []
        self.optimizers: dict[int, Any] = {}
        self.state_bytes: dict[int, int] = {}
        self._outcomes: dict[int, dict[int, Traced | StepFailed]] = {}  # micro-batch -> optimizer -> outcome
        self._parts: dict[int, OptimizerPart] = {}  # optimizer -> its step's part of a trace (`spliced`)
        params = self.fake.params
        for index, entry in enumerate(entries):
            hooks = _hook_ids(params)
            try:
                optimizer = self.fake.optimizer(entry)
            except Exception as exc:
                _remove_hooks_since(params, hooks)
                self.failed[index] = classify(entry, exc)
                continue
            # One that changes backward itself (LOMO's update inside it, SophiaH's gradient graph, any that hooks
            # the parameters) runs its own step; its hooks leave the shared model, whose backward stays everyone's
            hooked = _remove_hooks_since(params, hooks)
            if hooked or fused_update(optimizer) is not None or needs_gradient_graph(optimizer):
                self.own_step.append(index)
                continue
            self.optimizers[index] = optimizer
        if self.optimizers:
            self._warm_up()

    def _warm_up(self) -> None:
        """Each optimizer's first step (clipping, scaler and zero_grad as the step runs them), from gradients of the
        parameters' shapes: its state appears, as in `FakeTrainer`'s first step. Those gradients are a forward and
        backward's under fp16's loss scaler (unscaling needs the scale backward made), else made directly, after one
        forward under FSDP2 (its lazy initialisation, and the unsharded parameters every later step resizes), for
        the parameters that get one from backward (`optimizers.trained.untrained_in`)."""
        import torch

        params = self.fake.params
        step = self.fake.step(next(iter(self.optimizers.values())), 1)
        # an error here is the model's, not an optimizer's: the caller's to handle
        if step.scaler is not None:
            step._forward_backward()
        else:
            if hasattr(self.fake.model, "_get_fsdp_state"):
                step.forward()  # FSDP2's lazy init and its unsharded parameters' storages, which steps resize
                for module in self.fake.model.modules():
                    reshard = getattr(module, "reshard", None)  # FSDPModule's
                    if callable(reshard):
                        reshard()  # what backward would have done: the root's stay gathered after forward
            # backward leaves these without a gradient, and so without state
            untrained = names_found(untrained_in(self.config.model, step.training.seq_len or 1))
            skipped = {id(param) for name, param in self.fake.model.named_parameters() if plain_name(name) in untrained}
            for param in params:
                param.grad = None if id(param) in skipped else torch.zeros_like(param)
        gradients = [p.grad for p in params]
        for index, optimizer in list(self.optimizers.items()):
            for param, gradient in zip(params, gradients, strict=True):
                param.grad = gradient
            step.optimizer = optimizer
            try:
                step._clip_and_step()
                self.state_bytes[index] = account_state(optimizer, params,
                                                        self.entries[index].second_moment_keys).state_bytes
            except Exception as exc:
                self.failed[index] = self.classify(self.entries[index], exc)
                del self.optimizers[index]
        for param in params:
            param.grad = None

    def outcome(self, micro_batch: int, index: int) -> Traced | StepFailed | None:
        """Optimizer `index`'s tracked step at `micro_batch`; None while not traced."""
        return self._outcomes.get(micro_batch, {}).get(index)

    def trace_all(self, wanted: dict[int, list[int]]) -> None:
        """Trace each micro-batch of `wanted` for the optimizers listed with it: the micro-batches at once, each in a
        forked child, each forking again after backward, one child per optimizer (`jobs` of those at a time, shared
        out among the micro-batches)."""
        sizes = sorted(wanted)
        if len(sizes) == 1:
            self._outcomes.setdefault(sizes[0], {}).update(self._branches(sizes[0], wanted[sizes[0]], self.jobs))
            return
        # every size at once, even past `jobs`: a size's child is busy for its forward and backward and then waits on
        # its optimizers' children, so a fixed set of slots would leave cores idle at the end of a round
        outer = len(sizes)
        inner = max(1, self.jobs // outer)

        def one_size(brancher: Any) -> dict[int, Traced | StepFailed]:
            size = sizes[brancher.fork()]
            return self._branches(size, wanted[size], inner)

        def failed(position: int, exc: BaseException) -> dict[int, Traced | StepFailed]:
            return {index: self.classify(self.entries[index], exc) for index in wanted[sizes[position]]}

        found = run_branched(one_size, len(sizes), outer, failed)
        for position, size in enumerate(sizes):
            died = dict.fromkeys(wanted[size], StepFailed(Status.FAILED, DIED))
            self._outcomes.setdefault(size, {}).update(found.get(position, died))

    def spliced(self, micro_batch: int, indices: list[int]) -> dict[int, Traced | StepFailed]:
        """The traces of `_branches` (no tensor peak), with forward and backward run here and each optimizer's step
        forked only the first time: its part of the trace (`TraceRecorder.part_since`: its state joining and its
        step, which no micro-batch or checkpointing or loss changes) is kept, and every later step of this model
        takes it (`with_part`) instead of running it. Where a part does not fit (it touched the forward's or
        backward's own allocations), the optimizer's step runs as `_branches` runs it."""
        recorder = self.fake.recorder()
        if recorder is None or self.tensor_peak:
            return self._branches(micro_batch, indices, self.jobs)
        step = self.fake.step(self.optimizers[indices[0]], micro_batch)
        missing = [index for index in indices if index not in self._parts]
        points: list[RecordingPoint] = []

        def compute(brancher: Any) -> OptimizerPart:
            def join() -> None:
                points.append(recorder.point())
                index = missing[brancher.fork()]  # the parent stops here (Branched), once its children are done
                step.optimizer = self.optimizers[index]
                recorder.join_state(state_tensors(step.optimizer, self.fake.params))

            recorded_step(step, recorder, join=join)
            return recorder.part_since(points[0])

        def failed(branch: int, exc: BaseException) -> StepFailed:
            return self.classify(self.entries[missing[branch]], exc)

        try:
            found: dict[int, OptimizerPart | StepFailed] = run_branched(compute, len(missing), self.jobs, failed)
        except Exception as exc:  # before the fork: forward or backward failed, as it would in each one's own step
            return {index: self.classify(self.entries[index], exc) for index in indices}
        finally:
            for param in self.fake.params:
                param.grad = None
        out: dict[int, Traced | StepFailed] = {}
        for branch, index in enumerate(missing):
            part = found.get(branch, StepFailed(Status.FAILED, DIED))
            if isinstance(part, StepFailed):
                out[index] = part
            else:
                self._parts[index] = part
        unfit = []
        for index in indices:
            if index in out:
                continue
            trace = recorder.with_part(self._parts[index], points[0])
            if trace is None:
                unfit.append(index)
            else:
                out[index] = Traced(None, trace)
        if unfit:
            out.update(self._branches(micro_batch, unfit, self.jobs))
        return out

    def _branches(self, micro_batch: int, indices: list[int], jobs: int) -> dict[int, Traced | StepFailed]:
        """One tracked step at `micro_batch`: forward and backward here, then a child per optimizer of `indices`.
        An optimizer whose child died gets a StepFailed saying so."""
        step = self.fake.step(self.optimizers[indices[0]], micro_batch)
        recorder = self.fake.recorder()

        def compute(brancher: Any) -> Traced:
            def join(tracked: TensorPeakTracker | None = None) -> None:
                index = indices[brancher.fork()]
                optimizer = self.optimizers[index]
                step.optimizer = optimizer
                if tracked is not None:
                    tracked.join(optimizer, self.state_bytes[index])
                if recorder is not None:
                    recorder.join_state(state_tensors(optimizer, self.fake.params))

            if not self.tensor_peak and recorder is not None:
                recorded_step(step, recorder, join=join)
                return Traced(None, recorder.finished_trace())
            peak = tracked_step(step, 0, recorder, join=join)
            return Traced(lowered(peak, self.fake.parameter_saving),
                          None if recorder is None else recorder.finished_trace())

        def failed(branch: int, exc: BaseException) -> StepFailed:
            return self.classify(self.entries[indices[branch]], exc)

        try:
            found: dict[int, Traced | StepFailed] = run_branched(compute, len(indices), jobs, failed)
        except Exception as exc:  # before the fork: forward or backward failed, as it would in each one's own step
            return {index: self.classify(self.entries[index], exc) for index in indices}
        finally:
            for param in self.fake.params:  # this process stopped after backward: no step dropped the gradients
                param.grad = None
        return {index: found.get(branch, StepFailed(Status.FAILED, DIED)) for branch, index in enumerate(indices)}


class SharedView(Simulated):
    """One optimizer's side of a SharedTrainer, as a FakeTrainer looks (`peak`, `trace`, `simulated`)."""

    def __init__(self, trainer: SharedTrainer, index: int) -> None:
        super().__init__(trainer.config)
        self.trainer = trainer
        self.index = index
        self.state_bytes = trainer.state_bytes[index]

    def _traced(self, micro_batch: int) -> Traced:
        found = self.trainer.outcome(micro_batch, self.index)
        if found is None:
            raise NeedTrace([micro_batch])
        if isinstance(found, StepFailed):
            raise StepFailure(found)
        return found

    def need(self, micro_batches: list[int]) -> None:
        missing = [size for size in dict.fromkeys(micro_batches) if self.trainer.outcome(size, self.index) is None]
        if missing:
            raise NeedTrace(missing)

    def peak(self, micro_batch: int) -> TrackedPeak:
        peak = self._traced(micro_batch).peak
        assert peak is not None, "the shared trainer recorded traces alone"
        return peak

    def trace(self, micro_batch: int) -> AllocationTrace:
        trace = self._traced(micro_batch).trace
        assert trace is not None
        return trace


@contextlib.contextmanager
def fake_run(config: PredictConfig, training: TrainingSettings) -> Iterator[tuple[Any, PlaceholderScalars]]:
    """What a step on fake tensors runs inside: the fake process group (a mesh, for FSDP2), fake tensors."""
    with contextlib.ExitStack() as stack:
        mesh = None
        if config.gpus > 1 or training.mp_param is not None:  # a policy is FSDP2's: one rank is a mesh too
            mesh = stack.enter_context(fake_process_group(config.gpus, config.strategy, config.shard_size))
        if config.gpus > 1 and training.device == DeviceKind.CPU:  # CPU ranks talk over gloo
            stack.enter_context(gloo_reduce_scatter_copies())
        stack.enter_context(adam_mini_on_cpu_ranks())
        yield mesh, stack.enter_context(fake_tensors())


def _output_shape_from_values(exc: BaseException) -> bool:
    """An op whose output's shape depends on tensor values (`nonzero`, `unique`, boolean masks: dbrx's and
    longcat_flash's expert loops), which fake tensors refuse with DynamicOutputShapeException."""
    from torch._subclasses.fake_tensor import DynamicOutputShapeException

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, DynamicOutputShapeException):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def classified(exc: BaseException, entry: OptimizerEntry, config: PredictConfig,
                scalars: PlaceholderScalars | None) -> tuple[StepFailed, bool]:
    """A failed step's status and reason, and whether the model had read tensor values (fake tensors have none
    to give it; a real step may well run: preflight leaves that undecided)."""
    status, reason = status_of(exc, entry, config.gpus, config.strategy)
    values_read = status == Status.FAILED and (
        (scalars is not None and bool(scalars.integer_reads)) or _output_shape_from_values(exc))
    if values_read:
        status, reason = Status.UNSUPPORTED, DATA_DEPENDENT + error_text(exc)
    return StepFailed(status, reason), values_read
