"""`optprof compare`: real training steps under each optimizer, each optimizer in a fresh process."""

from __future__ import annotations

import dataclasses
import functools
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from optprof.commands.micro_batch import search_max_micro_batch
from optprof.commands.predict import predict_optimizer, predict_rows
from optprof.commands.preflight import no_fit_row, shallow_layers, unsupported_row
from optprof.config import (
    MAX_MICRO_BATCH,
    SHARDED_STRATEGIES,
    CompareConfig,
    DeviceKind,
    PredictConfig,
    SearchSettings,
    TrainingSettings,
    check_training,
    default_reserve,
    resolve_seq_len,
    step_record,
)
from optprof.device.alloc_conf import ASYNC, AllocatorConfig
from optprof.distributed.torchrun import same_order, torchrun_group, torchrun_rank
from optprof.errors import UsageError
from optprof.hardware.catalog import LOCAL
from optprof.interrupts import Interrupted, TimeLimit, held_signals, stop_children, time_limit
from optprof.measure.ranks import run_joined, run_ranks
from optprof.measure.trial import TrialSpec, base_row, run_trial, trial_in_child
from optprof.model.loading import load_selection
from optprof.optimizers.registry import OptimizerEntry, availability, check_opt_args, resolve_optimizers
from optprof.processes.isolated import Isolated, run_isolated, start_warm_server
from optprof.results.reports import CompareReport, command_config
from optprof.results.rows import RANK_FOLD, CompareRow, PredictRow, Probe, interrupted_row
from optprof.results.vocab import Status


@dataclass(frozen=True)
class TrialRun:
    row: CompareRow
    device: dict[str, Any]
    killed: bool = False  # the trial process was SIGKILLed (on a CPU: most often out of host memory)


class TrialFailed(Exception):
    """A search probe failed for a reason other than memory: the search cannot go on."""

    def __init__(self, row: CompareRow) -> None:
        super().__init__(row.reason)
        self.row = row


class TrialRunner:
    """Runs one trial of one optimizer, in a fresh process unless `isolate` is off (tests only)."""

    def __init__(self, config: CompareConfig, isolate: bool, quiet: bool,
                 on_progress: Callable[[str, str], None] | None) -> None:
        self.config = config
        self.isolate = isolate
        self.quiet = quiet
        self.on_progress = on_progress
        self.device: dict[str, Any] = {}  # as the first trial that got a device saw it
        self.skipped: str | None = None  # why no more predictions are made here (a fake step ran past the limit)

    def progress(self, name: str, text: str) -> None:
        if self.on_progress is not None:
            self.on_progress(name, text)

    def run(self, entry: OptimizerEntry, training: TrainingSettings, label: str = "") -> TrialRun:
        def progress(text: str) -> None:
            self.progress(entry.name, label + text)

        config = self.config
        distributed = config.gpus > 1 or config.torchrun or training.mp_param is not None
        spec = TrialSpec(config.model, entry.name, training, config.opt_args,
                         strategy=config.strategy if distributed else None, shard_size=config.shard_size,
                         offload_optimizer=config.offload_optimizer,
                         memory_snapshot_dir=config.memory_snapshot_dir)
        progress("starting")
        if config.torchrun:
            result = Isolated(value=run_joined(spec, progress))
        elif distributed:  # several ranks, or FSDP2 over one (--mp-policy): a process group of spawned ranks
            result = run_ranks(spec, config.gpus, config.trial_timeout_s, progress, self.quiet)
        elif self.isolate:
            result = run_isolated(functools.partial(trial_in_child, quiet=self.quiet), spec,
                                  config.trial_timeout_s, progress)
        else:
            result = Isolated(value=run_trial(spec, progress))
        if result.value is None:
            failed = dataclasses.replace(base_row(entry, config.opt_args, training), status=Status.FAILED,
                                         reason=result.error, world_size=config.gpus, strategy=spec.strategy)
            return TrialRun(failed, {}, killed=result.killed)
        self.device = self.device or result.value.device
        return TrialRun(result.value.row, result.value.device)


def _probe(runner: TrialRunner, entry: OptimizerEntry, training: TrainingSettings, micro_batch: int) -> Probe:
    """Does one step at `micro_batch` fit? A short trial: warm-up, one step, and on a CPU the tracked step."""
    settings = dataclasses.replace(training, micro_batch=micro_batch, steps=1, sampler=False,
                                   breakdown=training.device == DeviceKind.CPU, time_optimizer_step=False)
    run = runner.run(entry, settings, f"micro-batch {micro_batch}: ")
    row = run.row
    limit = training.memory_limit_bytes or run.device.get("total_memory_bytes")
    if row.status == Status.OK and row.peak_bytes is not None:
        fits = limit is None or row.peak_bytes <= limit
        return Probe(micro_batch, fits, row.peak_bytes, limit, None if fits else "peak over the memory limit",
                     growing_bytes=row.fwd_bwd_peak_bytes)
    if row.status == Status.OOM or run.killed:
        return Probe(micro_batch, False, None, limit, row.reason)
    raise TrialFailed(row)


def _predict_config(runner: TrialRunner, names: tuple[str, ...], training: TrainingSettings, ranks: int,
                    search: SearchSettings | None) -> PredictConfig:
    config = runner.config
    limit = training.memory_limit_bytes if search is not None else None
    return PredictConfig(config.model, names, training, config.opt_args, gpu_memory_bytes=limit,
                         reserve_bytes=default_reserve(training.device), gpus=ranks, strategy=config.strategy,
                         shard_size=config.shard_size, max_micro_batch=search.max_micro_batch if search else
                         MAX_MICRO_BATCH, alloc_conf=allocator_model(training.device), gpu=config.gpu,
                         gpu_spec=config.gpu_spec)


def _predicted(runner: TrialRunner, entry: OptimizerEntry, training: TrainingSettings, ranks: int,
               search: SearchSettings | None = None) -> PredictRow:
    """`predict` for this optimizer over `ranks` (fake tensors, in this process). With a search and a known
    limit, it also predicts the largest micro-batch, where the search then starts."""
    return predict_optimizer(_predict_config(runner, (entry.name,), training, ranks, search), entry, training,
                             lambda text: runner.progress(entry.name, f"predicting: {text}"))


R = TypeVar("R")
LATE_PREDICTION: tuple[PredictRow | None, str | None] = (None, "its prediction ran past the time limit")
NO_PREDICTIONS: dict[str, PredictRow] = {}


def _limited(runner: TrialRunner, what: str, work: Callable[[], R], fallback: R) -> R:
    """`work()` in this process under the trial time limit: a fake step that never ends costs its decision (the
    fallback; the trial still runs, under its own limit), not the whole command. After one such overrun no
    further predictions are made here (`runner.skipped` says why)."""
    try:
        with held_signals(what), time_limit(runner.config.trial_timeout_s, what):
            return work()
    except TimeLimit as late:
        stop_children(grace_s=0.0, helpers=False)  # forked predict workers, if any were waiting
        runner.skipped = f"{late} (--trial-timeout): no prediction here"
        runner.progress(what.split("'")[0], str(late))
        return fallback


def _not_predicted(config: CompareConfig, skipped: str | None = None) -> str | None:
    """Why compare's rows get no prediction (None: they do)."""
    if skipped is not None:
        return skipped
    if not config.predict:
        return "--no-predict"
    if config.offload_optimizer:
        return OFFLOAD_NOT_PREDICTED
    if config.gpus > 1 and config.strategy not in SHARDED_STRATEGIES:
        return f"predict emulates {', '.join(SHARDED_STRATEGIES)}, not {config.strategy}"
    if config.torchrun and torchrun_rank() != 0:
        return "under torchrun, rank 0 predicts (its report is the one written)"
    return None


def _shared_predictions(runner: TrialRunner, entries: list[OptimizerEntry],
                        training: TrainingSettings) -> dict[str, PredictRow]:
    """Every optimizer's prediction at once, before any trial: one fake model and one forward and backward per
    micro-batch for all of them (predict.predict_rows), where each alone would build its own."""
    config = runner.config
    if _not_predicted(config, runner.skipped) is not None:
        return {}
    predict_config = _predict_config(runner, tuple(e.name for e in entries), training, config.gpus, config.search)
    rows = predict_rows(predict_config, entries, training,
                        lambda name, text: runner.progress(name, f"predicting: {text}"))
    return {row.optimizer: row for row in rows}


def _prediction(runner: TrialRunner, entry: OptimizerEntry, training: TrainingSettings,
                search: SearchSettings | None = None,
                shared: dict[str, PredictRow] | None = None) -> tuple[PredictRow | None, str | None]:
    """The row's prediction (see `_predicted`; from `shared` where it was made there), or why there is none."""
    why = _not_predicted(runner.config, runner.skipped)
    if why is not None:
        return None, why
    row = (shared or {}).get(entry.name) or _predicted(runner, entry, training, runner.config.gpus, search)
    return (row, None) if row.status == Status.OK else (None, f"predict {row.status}: {row.reason}")


def allocator_model(device: DeviceKind) -> str | None:
    """The caching-allocator model's settings for a CUDA run: this process's allocator configuration (the trials
    inherit it); None on a CPU, which has no caching allocator, and under backend:cudaMallocAsync, which the model
    does not follow (the predictions are then the tensor peaks)."""
    if device != DeviceKind.CUDA:
        return None
    config = AllocatorConfig.checked()
    return None if config.backend == ASYNC else config.text()


def prediction_errors(row: CompareRow, predicted_peak: int, reserve_bytes: int, allocated: int | None = None,
                      reserved: int | None = None) -> dict[str, float]:
    """(predicted / measured - 1) against each figure measured here: live tensors against the tensor peak; the
    allocator model's allocated and reserved peaks (else the tensor peak) against torch's; and the device total
    against NVML's count of this process."""
    pairs = {"tensor_peak_bytes": (predicted_peak, row.tensor_peak_bytes),
             "torch_max_allocated_bytes": (allocated or predicted_peak, row.torch_max_allocated_bytes),
             "torch_max_reserved_bytes": (reserved or predicted_peak, row.torch_max_reserved_bytes),
             "nvml_process_peak_bytes": ((reserved or predicted_peak) + reserve_bytes, row.nvml_process_peak_bytes)}
    return {name: predicted / measured - 1 for name, (predicted, measured) in pairs.items() if measured}


def _checked_against_prediction(runner: TrialRunner, entry: OptimizerEntry, training: TrainingSettings,
                                row: CompareRow, predicted: PredictRow | None) -> CompareRow:
    """The row with the predicted peak at its micro-batch and the prediction's error against each measured
    figure; the search's prediction when it stepped that size, else a prediction made now."""
    if row.status != Status.OK or row.micro_batch is None:
        return row
    peak = predicted.predicted_peaks.get(row.micro_batch) if predicted is not None else None
    same = predicted if predicted is not None and predicted.micro_batch == row.micro_batch else None
    # the allocator model's figures, or the step time, at this size
    if peak is None or (same is None and (training.device == DeviceKind.CUDA or runner.config.gpu is not None)):
        at_size = dataclasses.replace(training, micro_batch=row.micro_batch)
        same, why = _limited(runner, f"{entry.name}'s prediction", lambda: _prediction(runner, entry, at_size),
                             LATE_PREDICTION)
        if same is None:
            return dataclasses.replace(row, notes=(*row.notes, f"no prediction to check against: {why}"))
        peak = same.predicted_peak_bytes
    assert peak is not None
    allocated = None if same is None else same.predicted_allocated_bytes
    reserved = None if same is None else same.predicted_reserved_bytes
    errors = prediction_errors(row, peak, default_reserve(training.device), allocated, reserved)
    step_s = None if same is None else same.predicted_step_s
    if step_s is not None and row.step_s_p50:
        errors["step_s"] = step_s / row.step_s_p50 - 1  # against the measured median step
    return dataclasses.replace(row, predicted_peak_bytes=peak, predicted_reserved_bytes=reserved,
                               prediction_errors=errors, predicted_step_s=step_s,
                               predicted_phase_s={} if same is None else same.predicted_phase_s)


def _searched_row(runner: TrialRunner, entry: OptimizerEntry, training: TrainingSettings,
                  search: SearchSettings, predicted: PredictRow | None, why: str | None) -> CompareRow:
    """The largest micro-batch that fits, then a full trial at the size chosen, with the search recorded."""
    start = predicted.predicted_max_micro_batch if predicted is not None else None
    if training.memory_limit_bytes is None:
        why = "the limit is the card's own memory, which only the trial processes see"
    cold = () if start else (f"the search started without a prediction: {why or 'predicted 0'}",)
    try:
        found = search_max_micro_batch(lambda b: _probe(runner, entry, training, b),
                                       cap=search.max_micro_batch, start=start or None, margin=search.margin)
    except TrialFailed as failure:
        return failure.row
    limit = next((p.limit_bytes for p in found.probes if p.limit_bytes is not None), None)
    recorded: dict[str, Any] = {"memory_limit_bytes": limit, "max_micro_batch": found.max_micro_batch,
                "max_micro_batch_capped": found.capped, "trials": found.trials, "search": found.probes,
                "predicted_max_micro_batch": start}
    if found.max_micro_batch == 0:
        first = found.probes[0]
        short = first.peak_bytes - limit if first.peak_bytes is not None and limit is not None else None
        row = dataclasses.replace(base_row(entry, runner.config.opt_args, training), status=Status.NO_FIT,
                                  micro_batch=1, reason=f"does not fit at micro-batch 1 ({first.reason})",
                                  short_by_bytes=short, notes=cold)
        return dataclasses.replace(row, **recorded)
    measured = dataclasses.replace(training, micro_batch=found.chosen_micro_batch)
    row = runner.run(entry, measured, f"measuring at micro-batch {found.chosen_micro_batch}: ").row
    row = dataclasses.replace(row, **recorded, notes=(*cold, *row.notes))
    return _checked_against_prediction(runner, entry, training, row, predicted)


def _with_common_micro_batch(runner: TrialRunner, entries: list[OptimizerEntry], rows: list[CompareRow],
                             training: TrainingSettings) -> list[CompareRow]:
    """Tokens/s at the largest micro-batch every optimizer fits, so per-step speed compares like for like."""
    fitted = [r.micro_batch for r in rows if r.status == Status.OK and r.micro_batch]
    if not fitted:
        return rows
    common = min(fitted)
    updated = []
    for entry, row in zip(entries, rows, strict=True):
        if row.status != Status.OK:
            updated.append(row)
            continue
        tokens = row.tokens_per_s
        if row.micro_batch != common:
            at_common = dataclasses.replace(training, micro_batch=common)
            other = runner.run(entry, at_common, f"common micro-batch {common}: ").row
            tokens = other.tokens_per_s if other.status == Status.OK else None
        updated.append(dataclasses.replace(row, common_micro_batch=common, tokens_per_s_at_common=tokens))
    return updated


# Fake tensors all live on the CPU: a prediction cannot tell the host's share from the device's.
OFFLOAD_NOT_PREDICTED = ("predict does not separate host from device memory, which --offload-optimizer splits "
                         "(state, sharded parameters and gradients on the host)")


def _row(runner: TrialRunner, entry: OptimizerEntry, training: TrainingSettings, shallow: int | None,
         predictions: dict[str, PredictRow]) -> CompareRow:
    """One optimizer's row: decided before any launch where it can be (unavailable, unsupported, does not fit),
    else measured, and checked against its prediction."""
    config = runner.config
    reason = availability(entry)
    if reason is not None:  # no process needed to say so
        row = base_row(entry, config.opt_args, training)
        return dataclasses.replace(row, status=Status.UNAVAILABLE, reason=reason)
    unsupported = _limited(runner, f"{entry.name}'s preflight",
                           lambda: unsupported_row(config, entry, training, shallow), None)
    if unsupported is not None:
        return unsupported
    predicted, why = _limited(runner, f"{entry.name}'s prediction",
                              lambda: _prediction(runner, entry, training, config.search, predictions),
                              LATE_PREDICTION)

    def fit_prediction() -> PredictRow | None:
        """The row's own prediction, else one made for the fit: one device's for the replicated strategies."""
        if predicted is not None or runner.config.offload_optimizer or runner.skipped is not None:
            return predicted
        row = _predicted(runner, entry, training, config.gpus if config.strategy in SHARDED_STRATEGIES else 1)
        return row if row.status == Status.OK else None

    no_fit = _limited(runner, f"{entry.name}'s fit check", lambda: no_fit_row(config, entry, training, fit_prediction),
                      None)
    if no_fit is not None:
        return no_fit
    if config.search is not None:
        return _searched_row(runner, entry, training, config.search, predicted, why)
    return _checked_against_prediction(runner, entry, training, runner.run(entry, training).row, predicted)


def run_compare(
    config: CompareConfig,
    on_progress: Callable[[str, str], None] | None = None,
    on_row: Callable[[CompareRow], None] | None = None,
    isolate: bool = True,
    quiet: bool = True,
) -> CompareReport:
    """One trial per optimizer (a search and more trials with --micro-batch auto), in order.

    `isolate=False` runs the trials in this process (tests only).
    """
    _check(config, isolate)
    entries = resolve_optimizers(list(config.optimizers))  # unknown names fail before anything is built
    check_opt_args(entries, config.opt_args)
    loaded = load_selection(config.model)  # on meta: checks the model, cheaply
    info = loaded.info
    training = dataclasses.replace(config.training, seq_len=resolve_seq_len(
        config.training.seq_len, info.max_position_embeddings, config.training.device))
    runner = TrialRunner(config, isolate, quiet, on_progress)
    warm = isolate and not config.torchrun
    timing_here = config.gpu == LOCAL  # op times measured in this process: nothing may run beside them
    order = list(range(len(entries)))
    random.Random().shuffle(order)  # so that drift on a shared machine does not follow the optimizers' order
    by_index: dict[int, CompareRow] = {}
    interrupted: str | None = None
    try:
        if warm and not timing_here:
            start_warm_server()  # its imports overlap the predictions below
        predictions = _limited(runner, "the predictions", lambda: _shared_predictions(runner, entries, training),
                               NO_PREDICTIONS)
        if warm and timing_here:
            start_warm_server()
        shallow = shallow_layers(config, loaded.config)
        with torchrun_group(training.device, config.torchrun):  # after the predictions' own fake group
            order = same_order(order, config.torchrun)
            for index in order:
                row = _row(runner, entries[index], training, shallow, predictions)
                by_index[index] = row
                if on_row is not None:
                    on_row(row)
    except Interrupted as stop:  # keep what finished; the children are stopped before anything is written
        stop_children()
        interrupted = str(stop)
    rows = [by_index.get(i) or interrupted_row(base_row(entries[i], config.opt_args, training), interrupted)
            for i in range(len(entries))]
    if config.search is not None and interrupted is None:
        rows = _with_common_micro_batch(runner, entries, rows, training)
    return CompareReport(model=info, results=tuple(rows), device=runner.device, fwd_bwd_spread=fwd_bwd_spread(rows),
                         config=_report_config(config, training, entries, [entries[i].name for i in order], isolate),
                         interrupted=interrupted)


def _check(config: CompareConfig, isolate: bool) -> None:
    check_training(config.training, config.model.dtype)
    training = config.training
    if config.search is not None and training.memory_limit_bytes is None and training.device != DeviceKind.CUDA:
        raise UsageError("--micro-batch auto on a CPU needs --memory-limit: there is no device memory to fill")
    if config.search is not None and config.torchrun:
        raise UsageError("under torchrun, give a fixed --micro-batch: the search relaunches ranks in fresh processes")
    if (config.gpus > 1 or training.mp_param is not None) and not isolate:
        raise UsageError("--gpus N and --mp-policy run their ranks in fresh processes")


def _report_config(config: CompareConfig, training: TrainingSettings, entries: list[OptimizerEntry],
                   order: list[str], isolate: bool) -> dict:
    """What the run was asked to do, as the report records it (trial_order: the order the trials ran in)."""
    distributed = config.gpus > 1 or config.torchrun
    fsdp = training.mp_param is not None or (distributed and config.strategy in SHARDED_STRATEGIES)
    return {
        **command_config("compare", config.model, [e.name for e in entries], config.opt_args),
        **dataclasses.asdict(training),
        **step_record(config.model.dtype, training, distributed or fsdp, fsdp, config.opt_args),
        "micro_batch_search": None if config.search is None else dataclasses.asdict(config.search),
        "trial_timeout_s": config.trial_timeout_s,
        "isolated": isolate,
        "gpus": config.gpus,
        "strategy": config.strategy if distributed else None,
        "shard_size": config.shard_size,
        "offload_optimizer": config.offload_optimizer,
        "torchrun": config.torchrun,
        "gpu": config.gpu,
        "rank_fold": dict(RANK_FOLD) if distributed else None,
        "trial_order": order,
    }


def fwd_bwd_spread(rows: list[CompareRow]) -> float | None:
    """max / min - 1 of forward + backward time across the trials at the most common micro-batch."""
    sizes = [r.micro_batch for r in rows if r.status == Status.OK and r.forward_s is not None]
    if not sizes:
        return None
    size = max(set(sizes), key=sizes.count)
    times = [r.forward_s + r.backward_s for r in rows  # type: ignore[operator]
             if r.status == Status.OK and r.micro_batch == size and r.forward_s is not None]
    return max(times) / min(times) - 1 if len(times) >= 2 and min(times) > 0 else None
