"""`optprof plan`: the fastest predicted setup that fits, per optimizer, from a search over the setups a trainer
chooses between (how the model is sharded, activation checkpointing, the loss, the micro-batch and gradient
accumulation).

Each setup is one step on fake tensors, as predict runs it, at micro-batches 2 and 3 (every optimizer over one
forward and backward), traced on two shallow copies of the model and written for all its layers
(`shallow_step`); the setups of one strategy differ only in checkpointing and loss, and share their copies, each
built and warmed up once for all of them, each optimizer's step run once per copy and spliced into the others'
traces (`copy_setups`), each setup then written and costed in a forked child (`evaluate`). The trace at any other
micro-batch is
extrapolated from those two (each allocation's size and each op's cost on the line through its two values),
replayed through the caching-allocator model for the largest micro-batch that fits, and costed on the catalog
GPU's timeline. A setup is pruned, untraced, where a bound shows
it cannot fit: the sharded parameters, gradients and state alone exceed the card (before any trace), or the same
strategy and loss with full checkpointing (the least memory of those setups, traced first) does not fit
micro-batch 1. The chosen
setup per optimizer is confirmed by a full predict (the whole model traced at the chosen micro-batch), and any
difference is reported.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from optprof.commands.fake_step import DIED, Simulated, StepFailed
from optprof.commands.predict import run_predict, step_seconds, time_target
from optprof.commands.shallow_step import (
    CopyPair,
    Shallow,
    copy_setups,
    layer_periodic_setups,
    shallow_copies,
    written_setup,
)
from optprof.config import Dtype, PredictConfig, Strategy, parameter_dtype, resolve_seq_len
from optprof.device.replay import Replay
from optprof.device.trace import AllocationTrace, extrapolated, extrapolated_ops
from optprof.errors import UsageError, error_text
from optprof.interrupts import Interrupted, stop_children
from optprof.measure.flops import model_flops_per_token
from optprof.model.loading import load_selection
from optprof.optimizers.registry import OptimizerEntry, availability, check_opt_args, resolve_optimizers
from optprof.optimizers.trained import untrained_in
from optprof.processes.branching import Brancher, run_branched
from optprof.processes.forked import run_each
from optprof.results.reports import PlanReport, command_config
from optprof.results.rows import PlanRow
from optprof.results.vocab import Status

CHECKPOINTING = ("none", "selective-op", "selective-layer:2", "full")
LOSSES = ("default", "chunked:8")
TRACED_AT = (2, 3)  # micro-batches traced per setup; every other size is extrapolated from these two
RUNNERS_UP = 2
LINEAR_STEPS = 8  # sizes below the bound tried one by one before a bisection
SHARED_SETUPS = 6  # setups per piece of work that share their copies' build (more: fewer builds, idler workers)


@dataclass(frozen=True)
class Setup:
    """One way to train: the strategy (with its shard size for hsdp), activation checkpointing and the loss."""

    strategy: Strategy
    shard_size: int | None
    activation_checkpointing: str
    loss: str

    def label(self) -> str:
        sharding = f"hsdp:{self.shard_size}" if self.strategy == Strategy.HSDP else str(self.strategy)
        return f"{sharding}, AC {self.activation_checkpointing}, loss {self.loss}"

    def flags(self, gpus: int) -> str:
        sharding = f" --strategy {self.strategy}" if gpus > 1 else ""
        if self.strategy == Strategy.HSDP:
            sharding += f" --shard-size {self.shard_size}"
        return f"{sharding} --activation-checkpointing {self.activation_checkpointing} --loss {self.loss}"


def setups(gpus: int, gpus_per_node: int = 8, strategies: tuple[str, ...] | None = None,
           checkpointing: tuple[str, ...] = CHECKPOINTING, losses: tuple[str, ...] = LOSSES) -> list[Setup]:
    """Every setup for `gpus` GPUs: FSDP2 over all of them, hsdp sharded within a node (or within half the GPUs
    where they fit in one), zero2; on one GPU, the model unsharded. Times each checkpointing mode and loss.
    `strategies` (fsdp, hsdp, zero2), `checkpointing` and `losses` narrow the search."""
    shardings: list[tuple[Strategy, int | None]] = [(Strategy.FSDP, None)]
    if gpus > 1:
        group = gpus_per_node if gpus > gpus_per_node else gpus // 2
        if group > 1 and gpus % group == 0:
            shardings.append((Strategy.HSDP, group))
        shardings.append((Strategy.ZERO2, None))
    if strategies is not None:
        unknown = set(strategies) - {str(strategy) for strategy, _ in shardings}
        if unknown:
            raise UsageError(f"--strategy {', '.join(sorted(unknown))}: plan searches "
                             f"{', '.join(str(s) for s, _ in shardings)} on {gpus} GPU(s)")
        shardings = [(strategy, size) for strategy, size in shardings if str(strategy) in strategies]
    return [Setup(strategy, shard, mode, loss) for strategy, shard in shardings for mode in checkpointing
            for loss in losses]


@dataclass(frozen=True)
class PlanConfig:
    """The plan's search: each setup's predict configuration (as predict's flags would build it), the shared
    flags of the predict command that reproduces a setup, and the global batch to reach (tokens, or None)."""

    configs: tuple[tuple[Setup, PredictConfig], ...]
    reproduce: str  # "optprof predict MODEL --gpu ... --gpus N": each setup's own flags follow
    global_batch_tokens: int | None = None
    confirm: bool = True
    jobs: int = 1


@dataclass(frozen=True)
class Evaluated:
    """One optimizer under one setup, as the search found it (the row's figures before ranking)."""

    status: Status
    reason: str | None = None
    pruned: bool = False
    micro_batch: int | None = None
    grad_accum: int | None = None
    max_micro_batch: int | None = None
    reserved_bytes: int | None = None
    short_by_bytes: int | None = None
    step_s: float | None = None
    phase_s: dict[str, float] = dataclasses.field(default_factory=dict)
    trace_method: str | None = None


class _Traces(Simulated):
    """One optimizer's traces of one setup at TRACED_AT, and any micro-batch on their line (each written once), with
    their replays through the caching-allocator model (`Simulated`: once per micro-batch and capacity). A written
    trace holds the allocations alone (what a replay reads) until its time is asked for (`timed_trace`): the search
    for the largest micro-batch replays several sizes and times one."""

    def __init__(self, config: PredictConfig, traces: dict[int, AllocationTrace]) -> None:
        super().__init__(config)
        self.traces: dict[int, AllocationTrace] = dict(traces)  # as traced: allocations and ops
        self.written: dict[int, AllocationTrace | None] = {}  # on the line: allocations (no ops)
        self.usable = _usable(config)

    def at(self, micro_batch: int) -> AllocationTrace | None:
        """The trace at `micro_batch` (its ops only where traced); None where no line holds through the traced two."""
        if micro_batch in self.traces:
            return self.traces[micro_batch]
        if micro_batch not in self.written:
            low, high = (self.traces[size] for size in TRACED_AT)
            self.written[micro_batch] = extrapolated(low, high, TRACED_AT[0], micro_batch)
        return self.written[micro_batch]

    def timed_trace(self, micro_batch: int) -> AllocationTrace | None:
        """The trace at `micro_batch` with its ops, for the step's time; None where no line holds for them."""
        trace = self.at(micro_batch)
        if trace is None or micro_batch in self.traces:
            return trace
        low, high = (self.traces[size] for size in TRACED_AT)
        ops = extrapolated_ops(low, high, TRACED_AT[0], micro_batch)
        return None if ops is None else dataclasses.replace(trace, ops=ops)

    def trace(self, micro_batch: int) -> AllocationTrace:
        found = self.at(micro_batch)
        assert found is not None
        return found

    def fits(self, micro_batch: int) -> bool:
        """Whether the step at `micro_batch` replays without running out of the card's memory."""
        return self.at(micro_batch) is not None and self.on_card(micro_batch).oom is None

    def on_card(self, micro_batch: int) -> Replay:
        replayed = self.simulated(micro_batch, self.usable)
        assert replayed is not None  # a CUDA target: the allocator model is on
        return replayed

    def unlimited(self, micro_batch: int) -> int:
        """The step's reserved peak on a card without a limit (how much a step that does not fit needs)."""
        replayed = self.simulated(micro_batch, None)
        assert replayed is not None
        return replayed.peak_reserved


def _usable(config: PredictConfig) -> int:
    assert config.gpu_memory_bytes is not None
    return config.gpu_memory_bytes - config.reserve_bytes


def _largest(traces: _Traces, cap: int) -> int:
    """The largest micro-batch from 2 up to `cap` whose replay fits the card (0: not even 2). The line through the
    peaks allocated at 2 and 3 bounds it from above (a step's allocations alone cannot pass the card, and the peak
    allocated grows at least as fast past 3: a maximum of lines), so the search starts there and steps down one size
    at a time (the cache's fragmentation costs a few sizes, and can leave a size that fits above one that does not:
    llama-3.1-8b, hsdp, full checkpointing, Adam-mini fits 8 and 10, not 9), for LINEAR_STEPS sizes; further down, by
    doubling steps and a bisection. Up where the bound itself fits."""
    low, high = TRACED_AT
    if not traces.fits(low):
        return 0
    if high > cap or not traces.fits(high):
        return low
    allocated = [traces.on_card(size).peak_allocated for size in TRACED_AT]
    growth = allocated[1] - allocated[0]
    bound = cap if growth <= 0 else max(high, min(cap, low + (traces.usable - allocated[0]) // growth))
    largest, miss, step = high, cap + 1, 1
    if traces.fits(bound):
        largest = bound
        while largest < cap:  # not a bound after all: gallop up
            probe = min(cap, largest + step)
            if not traces.fits(probe):
                miss = probe
                break
            largest, step = probe, step * 2
    else:
        # nothing above a bound fits: the first fit below it is the largest (no bound where nothing grows: the cap)
        stop = max(high + 1, bound - (LINEAR_STEPS if growth > 0 else 0))
        for size in range(bound - 1, stop - 1, -1):
            if traces.fits(size):
                return size
        if stop == high + 1:
            return high
        miss = stop
        while miss - step > largest:
            probe = miss - step
            if traces.fits(probe):
                largest = probe
                break
            miss, step = probe, step * 2
    while largest + 1 < miss:
        middle = (largest + miss) // 2
        largest, miss = (middle, miss) if traces.fits(middle) else (largest, middle)
    return largest


def _timed(traces: _Traces, config: PredictConfig, micro_batch: int, accumulation: int
           ) -> tuple[float, dict[str, float]] | None:
    """The step's predicted seconds and phases at `micro_batch`, with `accumulation` micro-batches per step: forward,
    backward and the exposed communication once per micro-batch, the optimizer once (an assumption the notes
    state; the confirming predict traces the accumulation itself)."""
    trace = traces.timed_trace(micro_batch)
    if trace is None:
        return None
    timed = step_seconds(trace, config, config.training)
    phases = dict(timed.phase_s)
    for phase in ("forward", "backward", "exposed_communication"):
        phases[phase] = phases.get(phase, 0.0) * accumulation
    return sum(phases.values()), phases


def _per_rank_sequences(config: PredictConfig, global_batch_tokens: int | None, seq_len: int) -> int | None:
    if global_batch_tokens is None:
        return None
    ranks = config.gpus * config.replicas
    if global_batch_tokens % (ranks * seq_len):
        raise UsageError(f"--global-batch {global_batch_tokens:,} tokens is not a whole number of {seq_len}-token "
                         f"sequences per GPU over {ranks} GPUs")
    return global_batch_tokens // (ranks * seq_len)


def _chosen_size(traces: _Traces, config: PredictConfig, largest: int, sequences: int | None
                 ) -> tuple[int, int, float, dict[str, float]] | None:
    """(micro-batch, accumulation, step seconds, phases): the largest that fits (no global batch), else the fastest
    micro-batch that divides each GPU's sequences per step."""
    if sequences is None:
        timed = _timed(traces, config, largest, 1)
        return None if timed is None else (largest, 1, *timed)
    best = None
    for size in range(1, min(largest, sequences) + 1):
        if sequences % size:
            continue
        timed = _timed(traces, config, size, sequences // size)
        if timed is not None and (best is None or timed[0] < best[2]):
            best = (size, sequences // size, *timed)
    return best


def _bound(config: PredictConfig, params: int, state_bytes: dict[str, int], entry: OptimizerEntry) -> int | None:
    """What the parameters, gradients and state hold per rank, sharded (a lower bound of any step's peak)."""
    if entry.name not in state_bytes:
        return None
    width = 2 if parameter_dtype(config.model, config.training) in (Dtype.BFLOAT16, Dtype.FLOAT16) else 4
    shards = config.shard_size or config.gpus  # every searched strategy shards with FSDP2 (hsdp within its group)
    return (2 * params * width + state_bytes[entry.name]) // shards


def evaluate(setup_configs: list[PredictConfig], entries: list[OptimizerEntry], sequences: int | None, jobs: int
             ) -> list[list[Evaluated]]:
    """Every optimizer of `entries` under each setup of one strategy (they differ in checkpointing and loss, and
    share their shallow copies, each built and warmed up once: `copy_setups`): traced at TRACED_AT, then per setup
    in a forked child (`jobs` at a time: the piece's last setups fill a core that another piece has left idle), its
    whole-model traces written, its largest micro-batch and the chosen size's time; only the rows come back. A step
    that does not fit 2 is traced at 1 (a step of its own: it often allocates one tensor fewer), once for every
    setup and optimizer that needs it, here."""
    copies = shallow_copies(setup_configs[0])
    pairs = copy_setups(setup_configs, entries, list(TRACED_AT), copies)

    def one(brancher: Brancher) -> tuple[list[Evaluated | None], str]:
        place = brancher.fork()
        return _setup_rows(setup_configs[place], entries, copies, pairs[place], sequences)

    def failed(place: int, exc: BaseException) -> tuple[list[Evaluated | None], str]:
        return [Evaluated(Status.FAILED, error_text(exc)) for _ in entries], ""

    found = run_branched(one, len(setup_configs), jobs, failed)
    rows = [found.get(place, ([Evaluated(Status.FAILED, DIED) for _ in entries], ""))
            for place in range(len(setup_configs))]
    needing = [place for place, (row, _) in enumerate(rows) if None in row]
    wanted = sorted({index for place in needing for index, row in enumerate(rows[place][0]) if row is None})
    if needing:
        ones = layer_periodic_setups([setup_configs[place] for place in needing], [entries[i] for i in wanted], [1],
                                     copies)
        for place, (outcomes, _) in zip(needing, ones, strict=True):
            row, method = rows[place]
            for index, at_one in zip(wanted, outcomes, strict=True):
                if row[index] is not None:
                    continue
                row[index] = Evaluated(at_one.status, at_one.reason, trace_method=method) \
                    if isinstance(at_one, StepFailed) else \
                    _evaluated(setup_configs[place], _Traces(setup_configs[place], at_one), 0, sequences, method)
    return [[_filled(row) for row in found_rows] for found_rows, _ in rows]


def _filled(row: Evaluated | None) -> Evaluated:
    assert row is not None  # `evaluate` traced every optimizer that did not fit 2 at 1
    return row


def _setup_rows(config: PredictConfig, entries: list[OptimizerEntry], copies: Shallow | str, pair: CopyPair | None,
                sequences: int | None) -> tuple[list[Evaluated | None], str]:
    """One setup's rows from its copies' traces (`written_setup`), and the method's note; None for an optimizer
    whose step does not fit micro-batch 2 (`evaluate` traces it at 1)."""
    outcomes, method = written_setup(config, entries, list(TRACED_AT), copies, pair)
    rows: list[Evaluated | None] = []
    for outcome in outcomes:
        if isinstance(outcome, StepFailed):
            rows.append(Evaluated(outcome.status, outcome.reason, trace_method=method))
            continue
        traces = _Traces(config, outcome)
        largest = _largest(traces, config.max_micro_batch)
        rows.append(None if largest == 0 else _evaluated(config, traces, largest, sequences, method))
    return rows, method


def _evaluated(setup_config: PredictConfig, traces: _Traces, largest: int, sequences: int | None,
               method: str) -> Evaluated:
    """One optimizer under one setup, from its traces and its largest micro-batch from 2 (0: its trace at 1
    decides)."""
    if largest == 0:
        assert 1 in traces.traces  # `evaluate` traced it (where that failed, the row says so instead)
        if not traces.fits(1):
            needed = traces.unlimited(1)  # by how much: less what this card has
            return Evaluated(Status.NO_FIT, "does not fit at micro-batch 1", reserved_bytes=needed,
                             short_by_bytes=max(0, needed - traces.usable), trace_method=method)
        largest = 1
    chosen = _chosen_size(traces, setup_config, largest, sequences)
    if chosen is None:
        reason = ("its ops at micro-batch {largest} are not on the line through micro-batches 2 and 3, so its "
                  "time cannot be written" if sequences is None else
                  "no micro-batch that fits divides each GPU's share of the global batch")
        return Evaluated(Status.NO_FIT if sequences is not None else Status.FAILED, reason.format(largest=largest),
                         max_micro_batch=largest, trace_method=method)
    size, accumulation, step_s, phases = chosen
    # on the card: the allocator frees its cache and retries before it fails, as predict's replay does
    reserved = traces.on_card(size).peak_reserved
    return Evaluated(Status.OK, micro_batch=size, grad_accum=accumulation, max_micro_batch=largest,
                     reserved_bytes=reserved, step_s=step_s, phase_s=phases, trace_method=method)


def run_plan(config: PlanConfig, on_progress: Callable[[str], None] = lambda text: None) -> PlanReport:
    started = time.perf_counter()
    first = config.configs[0][1]
    entries = resolve_optimizers(list(first.optimizers))
    check_opt_args(entries, first.opt_args)
    loaded = load_selection(first.model)
    info = loaded.info
    seq_len = resolve_seq_len(first.training.seq_len, info.max_position_embeddings, first.training.device)
    configs = [(setup, dataclasses.replace(c, training=dataclasses.replace(c.training, seq_len=seq_len)))
               for setup, c in config.configs]
    sequences = _per_rank_sequences(first, config.global_batch_tokens, seq_len)
    missing = {e.name: reason for e in entries if (reason := availability(e)) is not None}
    available = [e for e in entries if e.name not in missing]
    from optprof.commands.state_size import run_state_size
    from optprof.config import StateSizeConfig

    state = run_state_size(StateSizeConfig(first.model, tuple(e.name for e in available), first.opt_args))
    state_bytes = {row.optimizer: row.state_bytes for row in state.results if row.state_bytes is not None}
    shallow_copies(first)  # the model's layer pattern, read once before the workers fork
    untrained_in(first.model, seq_len)  # and which parameters get no gradient (each fake step's warm-up asks)
    results: dict[tuple[int, str], Evaluated] = {}
    for name, reason in missing.items():
        for index in range(len(configs)):
            results[(index, name)] = Evaluated(Status.UNAVAILABLE, reason)
    # bounds: the sharded parameters, gradients and state alone
    for index, (_, setup_config) in enumerate(configs):
        for entry in available:
            bound = _bound(setup_config, info.params, state_bytes, entry)
            if bound is not None and bound > _usable(setup_config):
                results[(index, entry.name)] = Evaluated(
                    Status.NO_FIT, "parameters, gradients and state alone exceed the card", pruned=True,
                    short_by_bytes=bound - _usable(setup_config))
    traced_setups = 0

    # the least-memory setup of each strategy and loss first: where it does not fit, neither do the others of them
    least = _least_memory([setup for setup, _ in configs])

    def prune_by_least() -> None:
        for index, (setup, _) in enumerate(configs):
            bound_index = least.get((setup.strategy, setup.shard_size, setup.loss))
            if bound_index is None or bound_index == index:
                continue
            for entry in available:
                bounding = results.get((bound_index, entry.name))
                if bounding is not None and bounding.status == Status.NO_FIT and (index, entry.name) not in results:
                    results[(index, entry.name)] = Evaluated(
                        Status.NO_FIT, f"{configs[bound_index][0].label()}, the least memory of this strategy and "
                        "loss, does not fit", pruned=True, short_by_bytes=bounding.short_by_bytes)

    wanted = {index: [e for e in available if (index, e.name) not in results] for index in range(len(configs))}
    items = _shared_work([(index, configs[index]) for index in range(len(configs)) if wanted[index]], wanted)

    def one(position: int, here: bool) -> list[list[Evaluated]]:
        chunk = items[position]
        if here:
            on_progress(f"{len(chunk)} setup(s) from {configs[chunk[0]][0].label()}")
        return evaluate([configs[index][1] for index in chunk], wanted[chunk[0]], sequences, config.jobs)

    def kept(position: int, found: list[list[Evaluated]]) -> None:  # as each finishes: what a signal keeps
        nonlocal traced_setups
        for index, evaluated in zip(items[position], found, strict=True):
            traced_setups += 1
            for entry, row in zip(wanted[index], evaluated, strict=True):
                results[(index, entry.name)] = row  # a setup traced where a bound had pruned it: what it found

    def finished(position: int, found: list[list[Evaluated]]) -> None:
        kept(position, found)
        prune_by_least()
        on_progress(f"traced {', '.join(configs[index][0].label() for index in items[position])}")

    def needless(position: int) -> bool:  # every row of the piece pruned since: not traced
        return all((index, entry.name) in results for index in items[position] for entry in wanted[index])

    interrupted: str | None = None
    try:
        # one pass, the pieces with fewest setups first: a piece's setups are costed in its forked children at its
        # end, so the pieces with most, last, keep every core busy to the end (llama-3.1-8b on 8 H100s: 52 s, and
        # 56-59 s with selective-layer's pieces of two last). Among pieces of as many setups, those holding a
        # least-memory setup first (dearest first), so that a strategy whose least does not fit has its pieces not
        # yet begun pruned (`needless`), without a first pass that leaves a worker idle
        order = sorted(range(len(items)), key=lambda p: (len(items[p]), not set(items[p]) & set(least.values()),
                                                          -_cost(items[p], configs)))
        outcomes = run_each(one, len(items), config.jobs,
                            died=lambda position: [[Evaluated(Status.FAILED, "the worker died") for _ in wanted[i]]
                                                   for i in items[position]],
                            on_result=finished, order=order, skip=needless)
        for position, found in enumerate(outcomes):
            leading = items[position][0]
            if (leading, wanted[leading][0].name) not in results:  # its worker died: no result came
                kept(position, found)
    except Interrupted as stop:  # the setups searched so far are kept and ranked; the rest say so
        stop_children()
        interrupted = str(stop)
        for index in range(len(configs)):
            for entry in available:
                results.setdefault((index, entry.name), Evaluated(
                    Status.INTERRUPTED, f"{interrupted} stopped the search before this setup was traced"))
    searched_s = time.perf_counter() - started
    flops_per_token = model_flops_per_token(loaded.module, info, seq_len)
    rows = _ranked(configs, entries, results, config, flops_per_token, seq_len)
    confirm_s = None
    if config.confirm and interrupted is None:  # a signal asked to stop, not to go on
        confirming = time.perf_counter()
        try:
            rows = _confirmed(rows, configs, seq_len, on_progress)
        except Interrupted as stop:  # the search's rows stand, unconfirmed
            stop_children()
            interrupted = str(stop)
        confirm_s = time.perf_counter() - confirming
    considered = len(configs) * len(available)
    pruned = sum(1 for r in results.values() if r.pruned)
    methods = sorted({r.trace_method for r in results.values() if r.trace_method})
    target = time_target(first)
    return PlanReport(
        model=info, results=tuple(rows), interrupted=interrupted,
        config={**command_config("plan", first.model, [e.name for e in entries], first.opt_args),
                "gpu": first.gpu, "gpus": first.gpus * first.replicas, "seq_len": seq_len,
                "global_batch_tokens": config.global_batch_tokens, "gpu_memory_bytes": first.gpu_memory_bytes,
                "reserve_bytes": first.reserve_bytes, "recipe": first.training.recipe, "amp": first.training.amp,
                "alloc_conf": first.alloc_conf},
        search={"setups": len(configs), "considered": considered, "pruned": pruned,
                "traced": traced_setups, "searched_s": searched_s, "confirm_s": confirm_s},
        assumptions=tuple(methods) + _notes(config, target is not None),
    )


def _shared_work(setups: list[tuple[int, tuple[Setup, PredictConfig]]], wanted: dict[int, list[OptimizerEntry]]
                 ) -> list[list[int]]:
    """The setups (by index) in pieces of work: those of one strategy with the same shallow copies and optimizers
    share the copies' build and warm-up (`evaluate`), in pieces of at most SHARED_SETUPS, so that the workers stay
    busy; a setup traced whole goes alone."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    for index, (setup, setup_config) in setups:
        copies = shallow_copies(setup_config)
        key = (setup.strategy, setup.shard_size, copies if isinstance(copies, Shallow) else index,
               tuple(entry.name for entry in wanted[index]))
        groups.setdefault(key, []).append(index)
    return [group[start:start + SHARED_SETUPS] for group in groups.values()
            for start in range(0, len(group), SHARED_SETUPS)]


def _cost(chunk: list[int], configs: list[tuple[Setup, PredictConfig]]) -> int:
    """A piece's cost, roughly: the layers its traces run through (its setups' two shallow copies, else the whole
    model), so that the workers take the dearest first and none is left with one at the end."""
    copies = shallow_copies(configs[chunk[0]][1])
    return len(chunk) * (copies.small + copies.large if isinstance(copies, Shallow) else 10**6)


def _holds_less(one: Setup, other: Setup) -> bool:
    """Whether `one` holds no more memory than `other` by construction: the same loss, and it recomputes at least as
    much (full recomputes every block; selective modes more than none). The chunked loss is not less by
    construction: on two A800s at 4096 tokens, zero2 with AdamW and full checkpointing, its step at micro-batch 1
    reserved 0.47 GB more than the full loss's (the caching allocator's blocks, not the tensors)."""
    def recomputes(mode: str) -> int:
        return 2 if mode == "full" else 0 if mode == "none" else 1

    modes = (recomputes(one.activation_checkpointing), recomputes(other.activation_checkpointing))
    comparable = modes[0] > modes[1] or one.activation_checkpointing == other.activation_checkpointing or \
        modes[0] == 2
    return comparable and one.loss == other.loss


def _least_memory(found: list[Setup]) -> dict[tuple[Strategy, int | None, str], int]:
    """Per strategy and loss, the setup that holds no more than any other of them (by `_holds_less`), where one
    does."""
    least = {}
    for key in dict.fromkeys((s.strategy, s.shard_size, s.loss) for s in found):
        group = [i for i, s in enumerate(found) if (s.strategy, s.shard_size, s.loss) == key]
        bound = next((i for i in group if all(_holds_less(found[i], found[j]) for j in group)), None)
        if bound is not None:
            least[key] = bound
    return least


def _notes(config: PlanConfig, timed: bool) -> tuple[str, ...]:
    notes = [
        "each setup was predicted from fake tensors at micro-batches 2 and 3 (every optimizer over one forward "
        "and backward); other micro-batches on the line through those two: each allocation's size and each op's "
        "FLOPs and bytes (exact where the step's tensors grow linearly with the batch, as a decoder's do)",
        "largest micro-batch: the largest whose replay through the caching-allocator model fits the card, less what "
        "lies outside the allocator",
        "DDP and ZeRO-1 are not searched: predict shards with FSDP2 (compare measures them)",
    ]
    if config.global_batch_tokens is not None:
        notes.append("gradient accumulation: forward, backward and their exposed communication once per micro-batch, "
                     "the optimizer once per step (predicted from one micro-batch's step; the confirming predict "
                     "traces the accumulation itself); memory as at one micro-batch")
    if not timed:
        notes.append("no --gpu: nothing to rank by time")
    return tuple(notes)


def _ranked(configs: list[tuple[Setup, PredictConfig]], entries: list[OptimizerEntry],
            results: dict[tuple[int, str], Evaluated], config: PlanConfig, flops_per_token: float,
            seq_len: int) -> list[PlanRow]:
    """One row per optimizer and setup: per optimizer the chosen setup first (most tokens/s per GPU), then the
    runners-up and the slower by how much, then those that do not fit by how far and the rest."""
    rows: list[PlanRow] = []
    for entry in entries:
        own = []
        for index, (setup, setup_config) in enumerate(configs):
            found = results[(index, entry.name)]
            row = _row(entry.name, setup, setup_config, found, flops_per_token, seq_len, config.reproduce)
            own.append(row)
        fitting = sorted((r for r in own if r.status == Status.OK and r.predicted_tokens_per_s_per_gpu),
                         key=lambda r: -(r.predicted_tokens_per_s_per_gpu or 0))
        best = fitting[0].predicted_tokens_per_s_per_gpu if fitting else None
        ranked = []
        for place, row in enumerate(fitting):
            slower = None if best is None or place == 0 else 1 - (row.predicted_tokens_per_s_per_gpu or 0) / best
            choice = "chosen" if place == 0 else "runner-up" if place <= RUNNERS_UP else "slower"
            ranked.append(dataclasses.replace(row, choice=choice, slower_by=slower))
        rest = [r for r in own if r not in fitting]
        rest.sort(key=lambda r: (r.status != Status.NO_FIT, r.short_by_bytes or 0))
        ranked += [dataclasses.replace(r, choice="does not fit" if r.status == Status.NO_FIT else str(r.status))
                   for r in rest]
        rows += ranked
    return rows


def _row(optimizer: str, setup: Setup, setup_config: PredictConfig, found: Evaluated, flops_per_token: float,
         seq_len: int, reproduce: str) -> PlanRow:
    ranks = setup_config.gpus * setup_config.replicas
    per_gpu = mfu = None
    if found.step_s and found.micro_batch and found.grad_accum:
        per_gpu = found.micro_batch * found.grad_accum * seq_len / found.step_s
        target = time_target(setup_config)
        mfu = None if target is None else flops_per_token * per_gpu / target.gpu.peak("bf16")
    device = None if found.reserved_bytes is None else found.reserved_bytes + setup_config.reserve_bytes
    command = None
    if found.micro_batch is not None:
        accumulation = f" --grad-accum {found.grad_accum}" if (found.grad_accum or 1) > 1 else ""
        command = (f"{reproduce} -o {optimizer}{setup.flags(ranks)} --micro-batch {found.micro_batch}"
                   f"{accumulation}")
    return PlanRow(
        optimizer=optimizer, setup=setup.label(), strategy=str(setup.strategy), shard_size=setup.shard_size,
        activation_checkpointing=setup.activation_checkpointing, loss=setup.loss, status=found.status,
        reason=found.reason, pruned=found.pruned, micro_batch=found.micro_batch, grad_accum=found.grad_accum,
        max_micro_batch=found.max_micro_batch, predicted_reserved_bytes=found.reserved_bytes,
        predicted_device_bytes=device, device_memory_bytes=setup_config.gpu_memory_bytes,
        short_by_bytes=found.short_by_bytes, predicted_step_s=found.step_s, predicted_phase_s=found.phase_s,
        predicted_tokens_per_s_per_gpu=per_gpu, predicted_tokens_per_s=None if per_gpu is None else per_gpu * ranks,
        predicted_mfu=mfu, trace_method=found.trace_method, command=command)


def _confirmed(rows: list[PlanRow], configs: list[tuple[Setup, PredictConfig]], seq_len: int,
               on_progress: Callable[[str], None]) -> list[PlanRow]:
    """Each optimizer's chosen setup predicted again by the full method (the whole model traced at the chosen
    micro-batch and accumulation), its figures kept beside the plan's and their differences named."""
    by_label = {setup.label(): setup_config for setup, setup_config in configs}
    out = []
    for row in rows:
        if row.choice != "chosen" or row.micro_batch is None:
            out.append(row)
            continue
        on_progress(f"confirming {row.optimizer}: {row.setup}")
        setup_config = by_label[row.setup]
        training = dataclasses.replace(setup_config.training, micro_batch=row.micro_batch,
                                       grad_accum=row.grad_accum or 1, seq_len=seq_len)
        full = run_predict(dataclasses.replace(setup_config, optimizers=(row.optimizer,), training=training,
                                               max_micro_batch=row.micro_batch, full_model=True)).results[0]
        confirmed: dict[str, Any] = {
            "status": str(full.status), "predicted_reserved_bytes": full.predicted_reserved_bytes,
            "predicted_step_s": full.predicted_step_s,
            "predicted_tokens_per_s_per_gpu": full.predicted_tokens_per_s_per_gpu}
        differences = []
        if full.status != Status.OK:
            differences.append(f"the full predict says {full.status}: {full.reason}")
        else:
            if full.predicted_max_micro_batch is not None and full.predicted_max_micro_batch < row.micro_batch:
                differences.append("the full predict does not fit this micro-batch")
            for name, ours, theirs in (("reserved", row.predicted_reserved_bytes, full.predicted_reserved_bytes),
                                       ("step time", row.predicted_step_s, full.predicted_step_s)):
                if ours and theirs and abs(ours / theirs - 1) > 0.005:
                    differences.append(f"{name} {ours / theirs - 1:+.1%} against the full predict")
        confirmed["differences"] = differences or ["none (within 0.5%)"]
        out.append(dataclasses.replace(row, confirmed=confirmed))
    return out
