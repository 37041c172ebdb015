"""A step's trace from shallow copies of the model: layer-periodic tracing (device/periodic.py) put to work.

The model's layer pattern repeats every `period` layers (`model.layer_copies.layer_period`); copies of its
first `small` and `small + period` layers are traced on fake tensors, and the trace of all its layers is
written from those two (`LayerPeriodic`), which refuses unless it gives both back exactly. Where the pattern
does not repeat (or the copies would cost as much as the model) the whole model is traced, and the note says why.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from optprof.commands.fake_step import (
    DIED,
    FakeTrainer,
    NeedTrace,
    SharedTrainer,
    Simulated,
    StepFailed,
    Traced,
    classified,
    fake_run,
)
from optprof.config import Checkpointing, ModelSelection, PredictConfig, TrainingSettings
from optprof.device.periodic import LayerPeriodic, NotPeriodic, at_other_batch
from optprof.device.trace import AllocationTrace
from optprof.measure.checkpointing import save_ops
from optprof.measure.tracker import TrackedPeak, trace_peak, traced_state_bytes
from optprof.model.layer_copies import layer_period
from optprof.model.loading import LoadedModel, load_config
from optprof.optimizers.registry import OptimizerEntry
from optprof.processes.forked import run_each
from optprof.results.vocab import Status


@dataclass(frozen=True)
class Shallow:
    """Which copies stand for the model: `small` and `large` (= small + period) of its `blocks` layers."""

    blocks: int
    period: int
    small: int
    large: int


# (model, revision, trust_remote_code) -> its layer count and pattern period, read once per model
_PERIODS: dict[tuple[str, str | None, bool], tuple[int, int] | None] = {}


def model_period(selection: ModelSelection, built: LoadedModel | None = None) -> tuple[int, int] | None:
    """The model's layer count and pattern period, read once per model: from `built`, the caller's meta build of
    it, or from one built here (a 7B model's meta build takes about 2 s)."""
    key = (selection.model, selection.revision, selection.trust_remote_code)
    if key not in _PERIODS:
        if built is not None:
            _PERIODS[key] = layer_period(built.config, selection.trust_remote_code, built.module)
        else:
            config = load_config(selection.model, revision=selection.revision,
                                 trust_remote_code=selection.trust_remote_code)[0]
            _PERIODS[key] = layer_period(config, selection.trust_remote_code)
    return _PERIODS[key]


def shallow_copies(config: PredictConfig) -> Shallow | str:
    """The two copies to trace, or why the whole model is traced instead. The period is the layer pattern's, and
    a multiple of K under selective-layer:K checkpointing (every K-th block recomputed). The smaller copy holds the
    first layer (which may differ) and two periods, so that every repeating run shows twice; both copies end a
    whole number of periods before the model's last layer."""
    found = model_period(config.model)
    if found is None:
        return "the model names no layer count or list of layers"
    blocks, period = found
    if config.training.checkpointing == Checkpointing.SELECTIVE_LAYER:
        period = math.lcm(period, config.training.checkpoint_every)
    small = 1 + 2 * period
    if (blocks - small) % period:
        # the model ends part-way through a period, and so must the copies (llama-3.1-8b under selective-layer:2:
        # copies of 6 and 8 layers write the 12-layer trace as traced, and the 32-layer one as 8 and 10 do)
        small += (blocks - small) % period
    if small + 3 * period > blocks:  # room for the retry with one period more
        return f"its layers repeat every {period} of {blocks}: copies would cost about as much as the model"
    return Shallow(blocks, period, small, small + period)


# one optimizer's traces by micro-batch, or why its step failed
Outcome = dict[int, AllocationTrace] | StepFailed


def traced(config: PredictConfig, entries: list[OptimizerEntry], training: TrainingSettings,
           micro_batches: list[int], layers: int | None = None) -> list[Outcome]:
    """Each optimizer's traces at these micro-batches, on the model or a copy of its first `layers` layers: one
    forward and backward per micro-batch for all of them (`SharedTrainer`), an optimizer that changes backward on
    its own model (`FakeTrainer`). A failure is that optimizer's, classified as predict classifies it."""
    config = dataclasses.replace(config, layers=layers)
    found: dict[int, Outcome] = {}
    with fake_run(config, training) as (mesh, scalars):
        def classify(entry: OptimizerEntry, exc: BaseException) -> StepFailed:
            return classified(exc, entry, config, scalars)[0]

        # the copies' traces alone are read: recorded without MemTracker (a quarter of each fake step)
        trainer = SharedTrainer(config, entries, training, mesh, 1, classify, tensor_peak=False)
        found.update(trainer.failed)
        if trainer.optimizers:
            trainer.trace_all({size: list(trainer.optimizers) for size in micro_batches})
            found.update(_shared_outcomes(trainer.outcome, trainer.optimizers, micro_batches))
        for index in trainer.own_step:
            try:
                own = FakeTrainer(config, entries[index], training, mesh)
                found[index] = {size: own.trace(size) for size in micro_batches}
            except Exception as exc:
                found[index] = classify(entries[index], exc)
    return [found[index] for index in range(len(entries))]


def _shared_outcomes(outcome: Callable[[int, int], Traced | StepFailed | None], indices: Iterable[int],
                     micro_batches: list[int]) -> dict[int, Outcome]:
    """Each shared optimizer's traces at these micro-batches, from `outcome(micro-batch, optimizer)` (what
    `trace_all` or `spliced` brought back), or its failure."""
    found: dict[int, Outcome] = {}
    for index in indices:
        outcomes = [outcome(size, index) for size in micro_batches]
        failed = next((o for o in outcomes if isinstance(o, StepFailed)), None)
        found[index] = failed or {size: o.trace for size, o in zip(micro_batches, outcomes, strict=True)
                                  if isinstance(o, Traced) and o.trace is not None}
    return found


def _outcome_in(by_size: dict[int, dict[int, Traced | StepFailed]], micro_batch: int, index: int
                ) -> Traced | StepFailed | None:
    return by_size.get(micro_batch, {}).get(index)


def traced_setups(configs: list[PredictConfig], entries: list[OptimizerEntry], micro_batches: list[int],
                  layers: int | None = None) -> list[list[Outcome]]:
    """`traced` for setups that differ only in their checkpointing and loss (plan's, per strategy), on one model:
    built, sharded and warmed up once without either, each setup's applied for its steps (`FakeModel.configured`),
    which run here, one after another (warm: fake tensors' dispatch cache; a forked child's first step is a third
    dearer; shared out among forked children after the first, they cost 5 to 10% more CPU in all, copy-on-write),
    each optimizer's step forked once and spliced into every later trace (`SharedTrainer.spliced`). Equal to tracing
    each on its own (tests/integration/test_shared_setups.py), less a build and warm-up per setup (about 0.9 s of CPU
    for each of llama-3.1-8b's 3- and 4-layer copies over 8 ranks) and an optimizer's step per trace (Adam-mini's:
    0.1 s and a fork). llama-3.1-8b's plan on 8 H100s: 153 s of CPU before, 114 s after."""
    base_training = dataclasses.replace(configs[0].training, checkpointing=Checkpointing.NONE, loss_chunks=None)
    config = dataclasses.replace(configs[0], layers=layers, training=base_training)
    found: list[dict[int, Outcome]] = [{} for _ in configs]
    if any(setup.training.checkpointing == Checkpointing.SELECTIVE_OP for setup in configs):
        save_ops()  # read once here, not in each micro-batch's child that applies the setup (its import: 1.2 s)
    with fake_run(config, base_training) as (mesh, scalars):
        def classify(entry: OptimizerEntry, exc: BaseException) -> StepFailed:
            return classified(exc, entry, config, scalars)[0]

        trainer = SharedTrainer(config, entries, base_training, mesh, 1, classify, tensor_peak=False)
        for place in found:
            place.update(trainer.failed)
        for position, setup in enumerate(configs):
            outcomes: dict[int, dict[int, Traced | StepFailed]] = {}
            for size in micro_batches:
                if not trainer.optimizers:
                    break
                try:
                    with trainer.fake.configured(setup.training):
                        outcomes[size] = trainer.spliced(size, list(trainer.optimizers))
                except Exception as exc:  # the setup itself refused (a chunked loss on a model that softcaps logits)
                    outcomes[size] = {index: classify(entries[index], exc) for index in trainer.optimizers}
            found[position].update(_shared_outcomes(functools.partial(_outcome_in, outcomes), trainer.optimizers,
                                                    micro_batches))
    for index in trainer.own_step:  # one that changes backward: on its own model per setup, as `traced` runs it
        for position, setup in enumerate(configs):
            found[position][index] = traced(setup, [entries[index]], setup.training, micro_batches, layers)[0]
    return [[place[index] for index in range(len(entries))] for place in found]


def copy_traces(config: PredictConfig, entries: list[OptimizerEntry], training: TrainingSettings,
                micro_batches: list[int], copies: Shallow, jobs: int = 1) -> tuple[list[Outcome], list[Outcome]]:
    """Each optimizer's traces of the smaller and the larger copy at these micro-batches. The larger copy is traced
    at the first micro-batch (and at 1, which takes a path of its own), the rest written (`_completed`); with
    `jobs` > 1 the two copies are traced at once, in forked workers."""
    large_at = [*micro_batches[:1], *(size for size in micro_batches[1:] if size == 1)]
    work = [(copies.small, micro_batches), (copies.large, large_at)]

    def one_copy(index: int, here: bool) -> list[Outcome]:
        layers, sizes = work[index]
        return traced(config, entries, training, sizes, layers)

    def died(index: int) -> list[Outcome]:
        return [StepFailed(Status.FAILED, DIED)] * len(entries)

    small, first = run_each(one_copy, len(work), jobs, died)
    return small, _completed(small, first, micro_batches,
                             functools.partial(_traced_rest, config, training, entries, copies.large))


def layer_periodic_traces(config: PredictConfig, entries: list[OptimizerEntry], training: TrainingSettings,
                          micro_batches: list[int], copies: Shallow | str) -> tuple[list[Outcome], str]:
    """Each optimizer's traces of the whole model at these micro-batches, written from two shallow copies where
    its layers repeat (`copies`, from `shallow_copies`; traced by `copy_traces`), else traced whole, with a note
    that says which. Where the copies' runs are too short to tell a rule (a run that shows once), the copies grow by
    a period, once."""
    if isinstance(copies, str):
        return traced(config, entries, training, micro_batches), f"traced whole: {copies}"
    small, large = copy_traces(config, entries, training, micro_batches, copies)
    reason = ""
    for attempt in range(2):
        if attempt:  # one period more: the larger copy becomes the smaller
            copies = dataclasses.replace(copies, small=copies.large, large=copies.large + copies.period)
            small, large = large, traced(config, entries, training, micro_batches, copies.large)
        reason = _copy_failure(small, large) or ""
        if reason:  # a copy's step failed: the whole model's may not
            break
        written = _written(small, large, copies, micro_batches)
        if not isinstance(written, str):
            return written, layer_periodic_method(copies)
        reason = written
    return traced(config, entries, training, micro_batches), f"traced whole: {reason}"


def layer_periodic_setups(configs: list[PredictConfig], entries: list[OptimizerEntry], micro_batches: list[int],
                          copies: Shallow | str) -> list[tuple[list[Outcome], str]]:
    """`layer_periodic_traces` of setups that differ only in their checkpointing and loss and share their copies
    (plan's, per strategy), whose copies are each built and warmed up once for all of them (`copy_setups`), each
    setup's trace then written (`written_setup`)."""
    return [written_setup(config, entries, micro_batches, copies, pair)
            for config, pair in zip(configs, copy_setups(configs, entries, micro_batches, copies), strict=True)]


# one setup's outcomes on the smaller copy and on the larger (at every micro-batch: `_completed`)
CopyPair = tuple[list[Outcome], list[Outcome]]


def copy_setups(configs: list[PredictConfig], entries: list[OptimizerEntry], micro_batches: list[int],
                copies: Shallow | str) -> list[CopyPair | None]:
    """Each setup's traces of the two copies, traced together (`traced_setups`: each copy built and warmed up once
    for all of them); None for every setup where there is nothing to share (one setup, or no copies)."""
    if isinstance(copies, str) or len(configs) == 1:
        return [None] * len(configs)
    small = traced_setups(configs, entries, micro_batches, copies.small)
    large = [_completed(one, two, micro_batches,
                        functools.partial(_traced_rest, setup, setup.training, entries, copies.large))
             for setup, one, two in zip(configs, small,
                                        traced_setups(configs, entries, micro_batches[:1], copies.large), strict=True)]
    return list(zip(small, large, strict=True))


def written_setup(config: PredictConfig, entries: list[OptimizerEntry], micro_batches: list[int],
                  copies: Shallow | str, pair: CopyPair | None) -> tuple[list[Outcome], str]:
    """One setup's whole-model traces, written from its copies' (`pair`, from `copy_setups`) with the method's note;
    where they do not write it (or there is no pair), `layer_periodic_traces` on its own: one period more, then the
    whole model."""
    if pair is not None and isinstance(copies, Shallow):
        one, two = pair
        written = _written(one, two, copies, micro_batches) if _copy_failure(one, two) is None else ""
        if not isinstance(written, str):
            return written, layer_periodic_method(copies)
    return layer_periodic_traces(config, entries, config.training, micro_batches, copies)


def _completed(small: list[Outcome], large: list[Outcome], micro_batches: list[int],
               trace_rest: Callable[[list[int], list[int]], list[Outcome]]) -> list[Outcome]:
    """The larger copy's outcomes, traced at the first micro-batch only (`large`), at every one: each other
    micro-batch's trace written from the smaller copy's (`at_other_batch`), a quarter of a plan's tracing saved;
    the sizes where that is refused (micro-batch 1 often takes a path of its own), `trace_rest(optimizer indices,
    sizes)` traces."""
    first = micro_batches[0]
    done: list[Outcome] = []
    missing: dict[int, list[int]] = {}
    for index, (one, two) in enumerate(zip(small, large, strict=True)):
        if isinstance(one, StepFailed) or isinstance(two, StepFailed):
            done.append(two if isinstance(two, StepFailed) else one)
            continue
        written = {first: two[first]}
        for size in micro_batches[1:]:
            if size in two:  # traced
                written[size] = two[size]
                continue
            try:
                written[size] = at_other_batch(one[first], one[size], two[first])
            except NotPeriodic:
                missing.setdefault(index, []).append(size)
        done.append(written)
    for sizes in {tuple(sizes) for sizes in missing.values()}:  # only where there is a second micro-batch to write
        indices = [index for index, found in missing.items() if tuple(found) == sizes]
        for index, rest in zip(indices, trace_rest(indices, list(sizes)), strict=True):
            done[index] = rest if isinstance(rest, StepFailed) else {**done[index], **rest}  # type: ignore[dict-item]
    return done


def _traced_rest(config: PredictConfig, training: TrainingSettings, entries: list[OptimizerEntry], layers: int,
                 missing: list[int], sizes: list[int]) -> list[Outcome]:
    """The optimizers `missing` (indices into `entries`) traced on the copy of `layers` at these micro-batches: where
    `at_other_batch` refused to write them."""
    return traced(config, [entries[i] for i in missing], training, sizes, layers)


def _copy_failure(small: list[Outcome], large: list[Outcome]) -> str | None:
    """Why a copy's step failed, for the note, or None."""
    failed = next((o for o in [*small, *large] if isinstance(o, StepFailed)), None)
    return None if failed is None else f"a shallow copy's step failed ({failed.status}: {failed.reason})"


def _written(small: list[Outcome], large: list[Outcome], copies: Shallow, micro_batches: list[int]
             ) -> list[Outcome] | str:
    """Each optimizer's whole-model traces written from its copies' (`LayerPeriodic`), or why not, here: plan keeps
    them (written in forked workers, Llama-2-7B's took as long, the traces coming back pickled; predict writes them
    in its row's worker, from which only the row comes back)."""
    try:
        return [written_traces(one, two, copies, micro_batches)  # type: ignore[arg-type]
                for one, two in zip(small, large, strict=True)]
    except NotPeriodic as exc:
        return str(exc)


def written_traces(small: dict[int, AllocationTrace], large: dict[int, AllocationTrace], copies: Shallow,
                   micro_batches: list[int]) -> dict[int, AllocationTrace]:
    """One optimizer's whole-model traces at these micro-batches, written from its copies' (`LayerPeriodic`, learnt
    at the first and renumbered for the others, or learnt anew where they differ in more than numbers);
    NotPeriodic where they do not write it."""
    if not micro_batches:
        return {}
    first = LayerPeriodic(small[micro_batches[0]], large[micro_batches[0]], copies.small, copies.large)
    written = {micro_batches[0]: first.at(copies.blocks)}
    for size in micro_batches[1:]:
        try:
            learnt = first.renumbered(small[size], large[size])
        except NotPeriodic:
            learnt = LayerPeriodic(small[size], large[size], copies.small, copies.large)
        written[size] = learnt.at(copies.blocks)
    return written


def layer_periodic_method(copies: Shallow) -> str:
    return (f"layer-periodic: traced copies of {copies.small} and {copies.large} of its {copies.blocks} layers (a "
            f"period of {copies.period}), the rest written from them")


class PeriodicView(Simulated):
    """One optimizer's whole-model traces, written from shallow copies (`written_traces`), as predict's rows
    read a FakeTrainer: the tensor peak and its breakdown read from each trace (`trace_peak`, MemTracker's peak to
    the byte), the state from its tags. A micro-batch not in `traces` raises NeedTrace, as a SharedView's does."""

    def __init__(self, config: PredictConfig, traces: dict[int, AllocationTrace]) -> None:
        super().__init__(config)
        self.traces = traces
        self._peaks: dict[int, TrackedPeak] = {}

    @property
    def state_bytes(self) -> int:
        return traced_state_bytes(next(iter(self.traces.values())))

    def need(self, micro_batches: list[int]) -> None:
        missing = [size for size in dict.fromkeys(micro_batches) if size not in self.traces]
        if missing:
            raise NeedTrace(missing)

    def trace(self, micro_batch: int) -> AllocationTrace:
        self.need([micro_batch])
        return self.traces[micro_batch]

    def peak(self, micro_batch: int) -> TrackedPeak:
        if micro_batch not in self._peaks:
            self._peaks[micro_batch] = trace_peak(self.trace(micro_batch))
        return self._peaks[micro_batch]
