"""Result records: one frozen dataclass per row kind (bytes as int, seconds and fractions as float), and
how a distributed trial's rank rows fold into one."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from optprof.results.vocab import (
    FoldRule,
    Judgement,
    LayerExtent,
    MaxMethod,
    PeakSource,
    StateMethod,
    Status,
    Support,
)


@dataclass(frozen=True)
class Probe:
    micro_batch: int
    fits: bool
    peak_bytes: int | None = None  # measured peak; None when the step did not complete (OOM)
    limit_bytes: int | None = None  # what the peak was held against (the user's limit, or the card's memory)
    reason: str | None = None  # why it does not fit
    # The peak through forward and backward, in peak_bytes' terms: the part that grows with the micro-batch.
    # (The optimizer step's peak does not, and for small batches it is often the step's peak.)
    growing_bytes: int | None = None


@dataclass(frozen=True)
class StatePart:
    """One part of an optimizer that treats parts of the model differently (Muon's hidden matrices and the
    AdamW rest): its trainable parameters and the state kept for them."""

    name: str  # muon, adamw, projected (galore), ...
    holds: str  # which parameters, in words
    parameters: int  # elements
    state_bytes: int  # state kept per parameter of this part (step counters included); shared state is in none


@dataclass(frozen=True)
class OptimizerRow:
    """The head of every per-optimizer row: who the optimizer is, how it went, the settings in effect."""

    optimizer: str
    package: str
    package_version: str | None
    family: str
    status: Status
    reason: str | None = None
    settings: str | None = None  # memory-relevant settings in effect, e.g. GaLore's rank


@dataclass(frozen=True)
class StepRow(OptimizerRow):
    """A row about training steps: their shape."""

    micro_batch: int | None = None
    seq_len: int | None = None
    grad_accum: int | None = None
    world_size: int = 1


@dataclass(frozen=True)
class StateSizeRow(OptimizerRow):
    state_bytes: int | None = None
    bytes_per_param: float | None = None  # per trainable parameter
    ratio_vs_adamw: float | None = None
    saving_vs_adamw: float | None = None  # 1 - ratio
    state_dtypes: dict[str, int] = field(default_factory=dict)  # dtype -> bytes
    state_tensors: int | None = None  # distinct storages
    second_moment_entries: int | None = None  # adaptive "learning rates"; None if not adaptive
    second_moment_removed: float | None = None  # share of Adam's one per trainable parameter removed
    method: StateMethod | None = None  # how the state was obtained, e.g. "meta step"
    layer_extent: LayerExtent | None = None  # deep models: extrapolated from layer copies; None: stepped whole
    world_size: int = 1  # --gpus N: state_bytes is then one rank's (rank 0), sharded by FSDP2
    state_logical_bytes: int | None = None  # the unsharded size of that state (DTensor global shapes)
    state_parts: tuple[StatePart, ...] = ()  # split by part, for optimizers that treat parts differently


@dataclass(frozen=True)
class RankFigures:
    """One rank of a distributed trial (`--gpus N`), as that rank measured it."""

    rank: int
    status: Status
    peak_bytes: int | None
    state_bytes: int | None  # this rank's own (local) state
    tokens_per_s: float | None  # this rank's tokens
    step_s_p50: float | None
    tensor_peak_bytes: int | None
    torch_max_reserved_bytes: int | None
    nvml_process_peak_bytes: int | None
    rss_peak_bytes: int | None
    loss_first: float | None
    loss_last: float | None
    energy_j: float | None = None  # this rank's card


@dataclass(frozen=True)
class CompareRow(StepRow):
    """One optimizer's trial. Times are per optimizer step (all micro-batches), in seconds."""

    steps: int | None = None  # timed steps
    tokens_per_s: float | None = None  # global: micro_batch * seq_len * grad_accum * world_size / step_s_p50
    tokens_per_s_ci95: tuple[float, float] | None = None  # from the median step's 95% interval (>= 6 steps)
    step_s_p50: float | None = None
    step_s_p90: float | None = None
    forward_s: float | None = None  # means over the timed steps
    backward_s: float | None = None
    clip_s: float | None = None
    optimizer_s: float | None = None  # optimizer.step() and zero_grad()
    optimizer_share: float | None = None  # optimizer_s / mean step time
    # optimizer.step() + zero_grad repeated on one set of gradients after the timed steps: the median and its
    # distribution-free 95% interval. Forward and backward are the same for every optimizer at one micro-batch,
    # so this is where optimizers differ in time.
    optimizer_step_s: float | None = None
    optimizer_step_s_ci95: tuple[float, float] | None = None
    optimizer_step_repetitions: int | None = None
    model_flops_per_token: float | None = None  # PaLM formula: 6 per matmul weight + attention
    mfu: float | None = None  # model FLOPs utilisation; None when the device's peak is unknown
    state_bytes: int | None = None  # measured on the live optimizer, as state-size does
    state_parts: tuple[StatePart, ...] = ()  # one device: split by part, for optimizers that treat parts differently
    param_bytes: int | None = None
    grad_bytes: int | None = None
    peak_bytes: int | None = None  # the best peak figure for the device; its source in peak_source
    peak_source: PeakSource | None = None
    tensor_peak_bytes: int | None = None  # live tensors at the peak of a tracked step (MemTracker)
    fwd_bwd_peak_bytes: int | None = None  # the peak through forward and backward only, in peak_bytes' terms
    torch_max_allocated_bytes: int | None = None  # CUDA allocator, over the timed steps
    torch_max_reserved_bytes: int | None = None
    rss_peak_bytes: int | None = None  # process RSS, sampled over the timed steps
    rss_baseline_bytes: int | None = None  # RSS before the model was built (interpreter, torch, libraries)
    nvml_device_peak_bytes: int | None = None  # the whole card, sampled
    nvml_process_peak_bytes: int | None = None  # this process on the card, sampled
    # NVML's process peak less torch's max reserved: the CUDA context, NCCL's buffers and anything else outside
    # the caching allocator (derived; what predict --calibration reads)
    outside_allocator_bytes: int | None = None
    alloc_retries: int | None = None
    ooms: int | None = None
    energy_j: float | None = None  # NVML energy counter over the timed steps
    joules_per_token: float | None = None
    breakdown: dict[str, int] = field(default_factory=dict)  # the tensor-level peak by category
    # Mixture of experts: the busiest expert's tokens over the mean over the timed steps, worst layer
    # (1.0 = balanced). The memory of transformers' grouped experts path does not depend on it.
    expert_load: float | None = None
    loss_first: float | None = None
    loss_last: float | None = None
    losses: tuple[float, ...] = ()  # every step's loss, warm-up and tracked step included (a sanity trace)
    step_times_s: tuple[float, ...] = ()
    sampler_samples: int | None = None
    notes: tuple[str, ...] = ()  # what could not be measured here, and why
    derived: dict[str, str] = field(default_factory=dict)  # figure -> how it was derived (not measured directly)
    # The prediction (fake tensors, `predict`) at this row's micro-batch, against what was measured here:
    predicted_peak_bytes: int | None = None  # live tensors, per device
    predicted_reserved_bytes: int | None = None  # CUDA: the allocator model's max_memory_reserved at this size
    prediction_errors: dict[str, float] = field(default_factory=dict)  # measured figure -> predicted/measured - 1
    predicted_step_s: float | None = None  # with --gpu: the step time predicted (its error: prediction_errors.step_s)
    predicted_phase_s: dict[str, float] = field(default_factory=dict)  # forward, backward, optimizer, exposed comm.
    # --gpus N: state_bytes is then the logical total (unsharded), per-rank figures are under `ranks`
    strategy: str | None = None
    state_logical_bytes: int | None = None  # the state's unsharded size (DTensor global shapes)
    ranks: tuple[RankFigures, ...] = ()
    # --micro-batch auto: the search, then the measurement above at the size chosen
    memory_limit_bytes: int | None = None  # what each probe's peak was held against
    max_micro_batch: int | None = None  # largest that fits (0: not even 1)
    max_micro_batch_capped: bool | None = None  # the cap fits: the true maximum may be larger
    trials: int | None = None  # search probes (each a fresh process), not counting the measurements
    predicted_max_micro_batch: int | None = None  # where the search started: `predict` on fake tensors
    search: tuple[Probe, ...] = ()  # each probe: micro_batch, fits, peak_bytes, limit_bytes, reason
    short_by_bytes: int | None = None  # micro-batch 1's peak over the limit, when even 1 does not fit
    common_micro_batch: int | None = None  # the largest every optimizer fits
    tokens_per_s_at_common: float | None = None




# How the rows of a distributed trial's ranks fold into one (dist.fold_ranks): the group's total (sum; an
# interval's bounds are summed, which for ranks in lockstep is the group's interval), the
# worst rank (max), the average (mean), the figures of the rank with the slowest median step (times, so that
# the phases still add up) or with the largest tensor peak (its breakdown), the unsharded size (logical), or
# recomputed from the folded figures (derived). A figure not named is rank 0's: the same on every rank
# (settings, model FLOPs), or rank-specific and listed per rank under `ranks` (losses).
_SUM, _MAX, _SLOWEST = FoldRule.SUM, FoldRule.MAX, FoldRule.SLOWEST_RANK
RANK_FOLD: dict[str, FoldRule] = {
    "tokens_per_s": _SUM, "tokens_per_s_ci95": _SUM, "energy_j": _SUM, "alloc_retries": _SUM, "ooms": _SUM,
    "step_s_p50": _SLOWEST, "step_s_p90": _SLOWEST, "forward_s": _SLOWEST, "backward_s": _SLOWEST,
    "clip_s": _SLOWEST, "optimizer_s": _SLOWEST, "optimizer_share": _SLOWEST, "step_times_s": _SLOWEST,
    "optimizer_step_s": _SLOWEST, "optimizer_step_s_ci95": _SLOWEST, "optimizer_step_repetitions": _SLOWEST,
    "mfu": FoldRule.MEAN,
    "param_bytes": _MAX, "grad_bytes": _MAX, "peak_bytes": _MAX, "tensor_peak_bytes": _MAX,
    "fwd_bwd_peak_bytes": _MAX, "torch_max_allocated_bytes": _MAX, "torch_max_reserved_bytes": _MAX,
    "rss_peak_bytes": _MAX, "rss_baseline_bytes": _MAX, "nvml_device_peak_bytes": _MAX,
    "nvml_process_peak_bytes": _MAX, "outside_allocator_bytes": _MAX, "expert_load": _MAX,
    "breakdown": FoldRule.PEAK_RANK,
    "state_bytes": FoldRule.LOGICAL,
    "joules_per_token": FoldRule.DERIVED,
}


@dataclass(frozen=True)
class PredictRow(StepRow):
    """One optimizer's prediction. Every `predicted_` figure comes from fake tensors, not from a device."""

    state_bytes: int | None = None  # per device; exact: the real optimizer's state, on fake tensors
    predicted_peak_bytes: int | None = None  # live tensors at the peak, per device, at micro_batch
    # The caching-allocator model's replay of the step (CUDA targets): torch.cuda.max_memory_allocated and
    # max_memory_reserved as predicted, their difference, the cached blocks free at the moment of the reserved
    # peak (reusable by the next step's allocations: not waste), and where a step ran out of memory on the card
    # given (--gpu-memory); None without the model
    predicted_allocated_bytes: int | None = None
    predicted_reserved_bytes: int | None = None
    predicted_reserved_minus_allocated_bytes: int | None = None  # peak reserved - peak allocated
    predicted_cached_free_at_reserved_peak_bytes: int | None = None  # reserved - allocated at the reserved peak
    predicted_oom: str | None = None
    predicted_device_bytes: int | None = None  # what the card must hold: reserved (else the peak) + the costs outside
    predicted_breakdown: dict[str, int] = field(default_factory=dict)
    predicted_max_micro_batch: int | None = None  # under the device memory given (0: not even 1)
    predicted_max_capped: bool | None = None
    trials: int | None = None  # fake steps the search took (not those it solved from, at 2 and 3)
    predicted_max_method: MaxMethod | None = None  # solved from two traces and confirmed, or searched
    predicted_peak_at_max_bytes: int | None = None
    predicted_peaks: dict[int, int] = field(default_factory=dict)  # micro-batch -> peak, every size stepped
    # Time (with --gpu): the step's ops costed on the GPU and placed on their streams (device/timeline.py), at
    # micro_batch and at predicted_max_micro_batch (_at_max). Phases: forward, backward (recomputation included),
    # optimizer, exposed_communication, seconds, adding up to the step. Tokens/s global (all data-parallel ranks)
    # and per GPU; MFU as torchtitan computes it (model FLOPs per token x tokens/s per GPU / dense bf16 peak)
    predicted_step_s: float | None = None
    predicted_phase_s: dict[str, float] = field(default_factory=dict)
    predicted_communication_s: float | None = None  # every collective's own time, overlapped or not
    predicted_tokens_per_s: float | None = None
    predicted_tokens_per_s_per_gpu: float | None = None
    predicted_mfu: float | None = None
    predicted_step_s_at_max: float | None = None
    predicted_phase_s_at_max: dict[str, float] = field(default_factory=dict)
    predicted_tokens_per_s_at_max: float | None = None
    predicted_tokens_per_s_per_gpu_at_max: float | None = None
    predicted_mfu_at_max: float | None = None
    trace_method: str | None = None  # layer-periodic (which copies) or the whole model traced, and why
    predict_s: float | None = None  # wall time of this optimizer's prediction


@dataclass(frozen=True)
class PlanRow:
    """One setup under one optimizer in `optprof plan`. Every `predicted_` figure comes from fake tensors."""

    optimizer: str
    setup: str  # e.g. "fsdp, AC selective-op, loss chunked:8"
    strategy: str
    shard_size: int | None
    activation_checkpointing: str
    loss: str
    status: Status
    reason: str | None = None
    choice: str | None = None  # chosen, runner-up, slower, does not fit, or the status
    pruned: bool = False  # decided by a bound, nothing traced
    micro_batch: int | None = None  # the chosen size: the largest that fits, or the fastest for the global batch
    grad_accum: int | None = None
    max_micro_batch: int | None = None  # the largest whose replay fits the card
    predicted_reserved_bytes: int | None = None  # at micro_batch (where it does not fit: at the smallest tried)
    predicted_device_bytes: int | None = None  # reserved plus what lies outside the allocator
    device_memory_bytes: int | None = None  # the card's
    short_by_bytes: int | None = None  # does not fit: by how much
    predicted_step_s: float | None = None
    predicted_phase_s: dict[str, float] = field(default_factory=dict)
    predicted_tokens_per_s_per_gpu: float | None = None
    predicted_tokens_per_s: float | None = None  # all GPUs
    predicted_mfu: float | None = None
    slower_by: float | None = None  # 1 - tokens/s per GPU / the chosen setup's
    trace_method: str | None = None  # layer-periodic (which copies) or traced whole, and why
    command: str | None = None  # the predict command that reproduces this setup
    confirmed: dict[str, Any] = field(default_factory=dict)  # the chosen setup's full predict, and the differences


@dataclass(frozen=True)
class Verdict:
    """One guarded figure of `optprof check`: expected (the profile) against actual (this run)."""

    profile: str
    optimizer: str
    measure: str
    expected: float | None
    actual: float | None
    change: float | None  # relative: actual / expected - 1
    tolerance: float
    verdict: Judgement
    note: str | None = None


@dataclass(frozen=True)
class OptimizerListing:
    """One row of `optprof optimizers`."""

    name: str
    package: str
    version: str | None
    family: str
    available: bool
    reason: str | None
    description: str
    support: Support | None = None  # with --strategy: ok, unsupported, failed or unavailable under it
    support_reason: str | None = None


@dataclass(frozen=True)
class ModelListing:
    """One row of `optprof models`: a config bundled in profiles/models."""

    name: str
    description: str
    aliases: tuple[str, ...]


@dataclass(frozen=True)
class CorpusInfo:
    """The text `optprof tune` trained and evaluated on (split by document, so held-out text is unseen)."""

    source: str  # the folder or file, or the standard library's
    tokenizer: str  # "bytes" (vocabulary 256) or the folder of the model's tokenizer
    vocab_size: int
    train_documents: int
    held_out_documents: int
    train_tokens: int
    held_out_tokens: int


@dataclass(frozen=True)
class TuneTrial:
    """One tuning trial: a point of the optimizer's search space, trained for the run's budget."""

    index: int  # the point's place in the optimizer's quasi-random sequence (0-based)
    hyperparameters: dict[str, float]
    seed: int  # weights and batches; the same for every optimizer's trials, others for the noise re-runs
    status: Status  # ok, or why there is no loss (unsupported, oom, failed)
    reason: str | None = None
    val_loss: float | None = None  # held-out loss after the last step, nats per token; None when not finite
    diverged: bool = False  # a loss went NaN or infinite, or the held-out loss ended above the first loss
    first_loss: float | None = None  # the training loss before any update
    train_losses: tuple[float, ...] = ()  # one per step (NaN from where it diverged, the run stopped there)
    wall_s: float | None = None  # the whole trial: build, train, evaluate
    tokens_per_s: float | None = None  # training tokens / the median step time, first step excluded
    state_bytes: int | None = None  # what the optimizer keeps after the last step (as state-size counts it)


@dataclass(frozen=True)
class TuneRow(OptimizerRow):
    """One optimizer of `optprof tune`: its trials at equal budget, the best of them and its noise."""

    space: dict[str, str] = field(default_factory=dict)  # hyperparameter -> range and scale, as tuned
    trials: tuple[TuneTrial, ...] = ()
    best_val_loss: float | None = None  # over the trials that did not diverge
    best_hyperparameters: dict[str, float] | None = None
    best_trial: int | None = None  # its index
    median_val_loss: float | None = None  # over the trials that ran, a diverged one at its first loss
    val_loss_p25: float | None = None
    val_loss_p75: float | None = None
    diverged_fraction: float | None = None  # of the trials that ran
    noise_val_losses: tuple[float, ...] = ()  # the best trial's hyperparameters with other seeds
    noise_seeds: tuple[int, ...] = ()
    noise_range: float | None = None  # max - min of the best's held-out loss over its seed and noise_seeds
    noise_diverged: int = 0  # re-runs of the best that diverged (left out of noise_range)
    tokens_per_s: float | None = None  # median over the trials (each trial: one single-threaded worker)
    tokens_per_s_ci95: tuple[float, float] | None = None
    state_bytes: int | None = None  # the best trial's optimizer state


@dataclass(frozen=True)
class InclusionCheck:
    """special ⊆ general (the study's inclusion): the general optimizer, tuned as much, should reach a loss at
    most the special case's. `holds` within `margin`, the noise the run measured."""

    special: str
    general: str
    special_best: float | None
    general_best: float | None
    gap: float | None  # general_best - special_best: negative where the general one did better
    margin: float | None  # the larger of the two optimizers' noise ranges
    holds: bool | None  # gap <= margin; None where either optimizer has no best loss


@dataclass(frozen=True)
class BudgetRanking:
    """The optimizers ranked by the best held-out loss expected after `trials` trials, averaged over every
    order of the trials (exactly: the expected minimum of `trials` drawn without replacement)."""

    trials: int
    expected_best_val_loss: dict[str, float]
    ranking: tuple[str, ...]  # best first


RowT = TypeVar("RowT", StateSizeRow, CompareRow, PredictRow, "TuneRow")


def interrupted_row(row: RowT, signal_name: str | None) -> RowT:
    """`row` (its head: optimizer, settings) as a row the signal stopped before it finished."""
    return dataclasses.replace(row, status=Status.INTERRUPTED,
                               reason=f"{signal_name or 'a signal'} stopped the run before this row finished")


class FinishedRows(Generic[RowT]):
    """A command's rows by optimizer as they finish, each passed on to `on_row`: what an interrupt keeps."""

    def __init__(self, on_row: Callable[[RowT], None] | None) -> None:
        self.rows: dict[str, RowT] = {}
        self.on_row: Callable[[RowT], None] | None = on_row

    def __call__(self, row: RowT) -> None:
        self.rows[row.optimizer] = row
        if self.on_row is not None:
            self.on_row(row)

    def or_interrupted(self, heads: Iterable[RowT], signal_name: str) -> list[RowT]:
        """For each row head, its finished row, else the head as interrupted by `signal_name`."""
        return [self.rows.get(head.optimizer) or interrupted_row(head, signal_name) for head in heads]
