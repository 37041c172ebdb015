"""Result records: every report is a `Report` (schema name and version, environment, `failed`), written as
JSON and read back into equal objects, or flattened to a one-row-per-result DataFrame / CSV.

Bytes are int, times seconds and fractions floats in [0, 1]; nothing here formats units (report.py does).
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Union

from optprof import __version__
from optprof.errors import UsageError, read_user_file
from optprof.models import ModelInfo
from optprof.search import Probe

if TYPE_CHECKING:
    import pandas as pd

STATUS_OK = "ok"
STATUS_FAILED = "failed"  # the optimizer ran here and broke: a real problem, exit code 1
STATUS_UNAVAILABLE = "unavailable"  # cannot run on this machine (package missing): not an error
STATUS_OOM = "oom"  # ran out of device memory at this micro-batch: a finding, not an error
STATUS_UNSUPPORTED = "unsupported"  # this setup cannot run this way (the reason says why): a finding
STATUS_NO_FIT = "does not fit"  # --micro-batch auto: not even micro-batch 1 fits the memory limit

# The categories of a peak's breakdown (CompareRow.breakdown, PredictRow.predicted_breakdown), in table order.
BREAKDOWN_KEYS = ("parameters", "gradients", "optimizer_state", "activations", "temporaries")

# Which figure a compare row's peak_bytes is (the best one for the device).
PEAK_TORCH_RESERVED = "torch_max_reserved"  # CUDA: what the caching allocator held, exact
PEAK_TENSOR = "tensor_peak"  # CPU: live tensor bytes at the peak, from torch's MemTracker
PEAK_RSS = "rss_peak"  # CPU without the tracked step: sampled, overstates (the C allocator keeps freed memory)

# How a derived figure was obtained (CompareRow.derived): computed from measurements, not read off a counter.
DERIVED_FWD_BWD_CUDA = ("the allocator's allocated peak through the first timed backward, plus its reserved - "
                        "allocated gap over the timed steps (CUDA keeps no reserved peak per phase)")
DERIVED_MFU = ("model FLOPs per token (PaLM formula) x tokens/s / the device's dense data-sheet peak "
               "(or --peak-tflops)")

# How a state figure was obtained (StateSizeRow.method).
METHOD_META_STEP = "meta step"
METHOD_META_PLACEHOLDERS = "meta step, placeholder scalars"  # value reads answered by a placeholder
METHOD_FSDP_FAKE = "FSDP2 on fake tensors, fake process group"  # --gpus N: real sharding, no memory
# Repeated layers: stepped on copies of the model's first 1, 2 and 3 layers, every figure checked affine in the
# layer count and extrapolated to the whole model (appended to the method); WHOLE_MODEL where that did not hold.
EXTRAPOLATED = "extrapolated from the first 1, 2 and 3 layers"
WHOLE_MODEL = "whole model"

# Verdicts of `optprof check` (Verdict.verdict).
VERDICT_OK = "ok"
VERDICT_REGRESSION = "regression"
VERDICT_IMPROVED = "improved"
VERDICT_SKIPPED = "skipped"
VERDICT_MISSING = "missing"  # the optimizer failed or was unavailable: nothing to compare

ENVIRONMENT_PACKAGES = (
    "torch", "transformers", "adam-mini", "pytorch-optimizer", "bitsandbytes", "torchao",
    "nvidia-ml-py", "psutil", "pandas", "typer", "rich",
)


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo where there is one (platform.processor() is often empty on Linux)."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
    """Versions and machine facts that make a result reproducible; cheap (no CUDA initialisation)."""
    packages: dict[str, str | None] = {}
    for name in ENVIRONMENT_PACKAGES:
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            packages[name] = None
    return {
        "optprof": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "packages": packages,
    }


def command_config(command: str, selection: Any, optimizers: list[str], opt_args: dict[str, Any]) -> dict[str, Any]:
    """The head of every report's `config`: the command, the model selection, the optimizers and their args."""
    return {
        "command": command,
        **json.loads(json.dumps(dataclasses.asdict(selection))),  # as JSON gives it back (tuples as lists)
        "optimizers": optimizers,
        "opt_args": {k: repr(v) for k, v in opt_args.items()},
    }


# ---------------------------------------------------------------------------------------------- rows


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
    status: str
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
    method: str | None = None  # how the state was obtained, e.g. "meta step"
    world_size: int = 1  # --gpus N: state_bytes is then one rank's (rank 0), sharded by FSDP2
    state_logical_bytes: int | None = None  # the unsharded size of that state (DTensor global shapes)
    state_parts: tuple[StatePart, ...] = ()  # split by part, for optimizers that treat parts differently


@dataclass(frozen=True)
class RankFigures:
    """One rank of a distributed trial (`--gpus N`), as that rank measured it."""

    rank: int
    status: str
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
    peak_source: str | None = None
    tensor_peak_bytes: int | None = None  # live tensors at the peak of a tracked step (MemTracker)
    fwd_bwd_peak_bytes: int | None = None  # the peak through forward and backward only, in peak_bytes' terms
    torch_max_allocated_bytes: int | None = None  # CUDA allocator, over the timed steps
    torch_max_reserved_bytes: int | None = None
    rss_peak_bytes: int | None = None  # process RSS, sampled over the timed steps
    rss_baseline_bytes: int | None = None  # RSS before the model was built (interpreter, torch, libraries)
    nvml_device_peak_bytes: int | None = None  # the whole card, sampled
    nvml_process_peak_bytes: int | None = None  # this process on the card, sampled
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
    prediction_errors: dict[str, float] = field(default_factory=dict)  # measured figure -> predicted/measured - 1
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


FoldRule = Literal["sum", "max", "mean", "slowest rank", "peak rank", "logical", "derived"]

# How the rows of a distributed trial's ranks fold into one (dist.fold_ranks): the group's total (sum; an
# interval's bounds are summed, which for ranks in lockstep is the group's interval), the
# worst rank (max), the average (mean), the figures of the rank with the slowest median step (times, so that
# the phases still add up) or with the largest tensor peak (its breakdown), the unsharded size (logical), or
# recomputed from the folded figures (derived). A figure not named is rank 0's: the same on every rank
# (settings, model FLOPs), or rank-specific and listed per rank under `ranks` (losses).
RANK_FOLD: dict[str, FoldRule] = {
    "tokens_per_s": "sum", "tokens_per_s_ci95": "sum", "energy_j": "sum", "alloc_retries": "sum", "ooms": "sum",
    "step_s_p50": "slowest rank", "step_s_p90": "slowest rank", "forward_s": "slowest rank",
    "backward_s": "slowest rank", "clip_s": "slowest rank", "optimizer_s": "slowest rank",
    "optimizer_share": "slowest rank", "step_times_s": "slowest rank", "optimizer_step_s": "slowest rank",
    "optimizer_step_s_ci95": "slowest rank", "optimizer_step_repetitions": "slowest rank",
    "mfu": "mean",
    "param_bytes": "max", "grad_bytes": "max", "peak_bytes": "max", "tensor_peak_bytes": "max",
    "fwd_bwd_peak_bytes": "max", "torch_max_allocated_bytes": "max", "torch_max_reserved_bytes": "max",
    "rss_peak_bytes": "max", "rss_baseline_bytes": "max", "nvml_device_peak_bytes": "max",
    "nvml_process_peak_bytes": "max",
    "breakdown": "peak rank",
    "state_bytes": "logical",
    "joules_per_token": "derived",
    "expert_load": "max",
}


@dataclass(frozen=True)
class PredictRow(StepRow):
    """One optimizer's prediction. Every `predicted_` figure comes from fake tensors, not from a device."""

    state_bytes: int | None = None  # per device; exact: the real optimizer's state, on fake tensors
    predicted_peak_bytes: int | None = None  # live tensors at the peak, per device, at micro_batch
    predicted_device_bytes: int | None = None  # the peak plus the reserve: what the card must hold
    predicted_breakdown: dict[str, int] = field(default_factory=dict)
    predicted_max_micro_batch: int | None = None  # under the device memory given (0: not even 1)
    predicted_max_capped: bool | None = None
    trials: int | None = None  # fake steps the search took
    predicted_peak_at_max_bytes: int | None = None
    predicted_peaks: dict[int, int] = field(default_factory=dict)  # micro-batch -> peak, every size stepped
    predict_s: float | None = None  # wall time of this optimizer's prediction


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
    verdict: str
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
    support: str | None = None  # with --strategy: ok, unsupported, failed or unavailable under it
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
    status: str  # ok, or why there is no loss (unsupported, oom, failed)
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


# ------------------------------------------------------------------------------------------- reports


@dataclass(frozen=True, kw_only=True)
class Report:
    """What every report has. Subclasses name their schema and the field that holds their rows."""

    SCHEMA: ClassVar[str]
    SCHEMA_VERSION: ClassVar[int] = 1
    ROWS: ClassVar[str] = "results"  # the field holding one record per optimizer (or verdict, or listing)
    NAME: ClassVar[str] = "optimizer"  # the field of a row that names it (labelled by `optprof report`)

    environment: dict[str, Any] = field(default_factory=environment)
    created: str = field(default_factory=now_iso)

    def rows(self) -> tuple[Any, ...]:
        return getattr(self, self.ROWS)

    @property
    def failed(self) -> bool:
        """Whether the command should exit 1: a row broke (unavailable, oom and does-not-fit are findings)."""
        return any(getattr(row, "status", None) == STATUS_FAILED for row in self.rows())

    def to_dict(self) -> dict[str, Any]:
        body = dataclasses.asdict(self)
        head = {"schema": self.SCHEMA, "schema_version": self.SCHEMA_VERSION}
        own = {k: v for k, v in body.items() if k not in ("environment", "created")}
        return {**head, **own, "environment": body["environment"], "created": body["created"],
                "failed": self.failed}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        """The report `data` holds; a UsageError when it is another kind or a newer schema version."""
        schema, version = data.get("schema"), data.get("schema_version")
        if schema != cls.SCHEMA:
            raise UsageError(f"expected an {cls.SCHEMA} report, got {schema!r}")
        if not isinstance(version, int) or version > cls.SCHEMA_VERSION:
            raise UsageError(f"{schema} schema version {version} is newer than this optprof reads "
                             f"({cls.SCHEMA_VERSION}): upgrade optprof")
        return _decode(cls, data)

    @classmethod
    def from_json(cls, text: str) -> Report:
        return cls.from_dict(json.loads(text))

    def frame_head(self) -> dict[str, Any]:
        """Columns repeated on every row of the DataFrame, so that several runs concatenate."""
        return {}

    def to_frame(self) -> pd.DataFrame:
        import pandas as pd

        head = self.frame_head()
        return pd.DataFrame([_flat({**head, **dataclasses.asdict(row)}) for row in self.rows()])

    def to_csv(self) -> str:
        return self.to_frame().to_csv(index=False)

    def labelled(self, label: str) -> Report:
        """The same report with every row's name followed by `label` (rows of several runs, side by side)."""
        rows = tuple(dataclasses.replace(r, **{self.NAME: f"{getattr(r, self.NAME)} ({label})"}) for r in self.rows())
        return dataclasses.replace(self, **{self.ROWS: rows})


@dataclass(frozen=True, kw_only=True)
class ModelReport(Report):
    """A report about one model: its description, the command's settings, then one row per optimizer."""

    model: ModelInfo
    config: dict[str, Any]

    def frame_head(self) -> dict[str, Any]:
        m = self.model
        return {"model": m.name, "dtype": m.dtype, "params": m.params, "embedding_params": m.embedding_params,
                "embedding_fraction": m.embedding_fraction, "setup": m.setup,
                "trainable_params": m.params if m.trainable_params is None else m.trainable_params}


@dataclass(frozen=True, kw_only=True)
class StateSizeReport(ModelReport):
    SCHEMA: ClassVar[str] = "optprof.state-size"

    reference_state_bytes: int | None  # AdamW's, measured in the same run
    results: tuple[StateSizeRow, ...]


@dataclass(frozen=True, kw_only=True)
class CompareReport(ModelReport):
    SCHEMA: ClassVar[str] = "optprof.compare"

    results: tuple[CompareRow, ...]
    device: dict[str, Any]  # the device the trials ran on, as a trial process saw it
    # Forward + backward is the same work for every optimizer at one micro-batch, so the relative range of its
    # time across the trials (max / min - 1) is the machine's drift between trials, not an optimizer's
    # property: tokens/s differences within it are not findings. None with fewer than two such trials.
    fwd_bwd_spread: float | None = None


@dataclass(frozen=True, kw_only=True)
class PredictReport(ModelReport):
    SCHEMA: ClassVar[str] = "optprof.predict"

    results: tuple[PredictRow, ...]
    assumptions: tuple[str, ...]  # what fake CPU tensors cannot see, and what was assumed instead


@dataclass(frozen=True, kw_only=True)
class TuneReport(ModelReport):
    SCHEMA: ClassVar[str] = "optprof.tune"

    results: tuple[TuneRow, ...]
    inclusion: tuple[InclusionCheck, ...]
    ranking_by_budget: tuple[BudgetRanking, ...]
    corpus: CorpusInfo
    notes: tuple[str, ...] = ()  # how the figures were obtained: the protocol's choices


@dataclass(frozen=True, kw_only=True)
class CheckReport(Report):
    SCHEMA: ClassVar[str] = "optprof.check"
    ROWS: ClassVar[str] = "verdicts"

    verdicts: tuple[Verdict, ...]
    profiles: tuple[str, ...]
    strict: bool
    updated: dict[str, int]  # profile -> values rewritten (--update)

    def fails(self, verdict: Verdict) -> bool:
        """A regression or a missing figure fails; an improvement past the tolerance only under --strict."""
        return verdict.verdict in (VERDICT_REGRESSION, VERDICT_MISSING) or (
            self.strict and verdict.verdict == VERDICT_IMPROVED)

    @property
    def failed(self) -> bool:
        return any(self.fails(v) for v in self.verdicts)


@dataclass(frozen=True, kw_only=True)
class OptimizersReport(Report):
    SCHEMA: ClassVar[str] = "optprof.optimizers"
    ROWS: ClassVar[str] = "optimizers"
    NAME: ClassVar[str] = "name"

    optimizers: tuple[OptimizerListing, ...]
    inclusion_chains: tuple[tuple[str, ...], ...]  # from the optimizer study: A ⊆ B ⊆ C
    strategy: str | None = None  # the strategy the support column is about; None: no such column
    support_ranks: int | None = None  # fake ranks the support was decided on
    support_shard_size: int | None = None  # hsdp: ranks per shard group there
    support_model: str | None = None  # the model it was decided on


@dataclass(frozen=True, kw_only=True)
class ModelsReport(Report):
    SCHEMA: ClassVar[str] = "optprof.models"
    ROWS: ClassVar[str] = "models"
    NAME: ClassVar[str] = "name"

    models: tuple[ModelListing, ...]

    @classmethod
    def bundled(cls) -> ModelsReport:
        """The configs bundled in profiles/models."""
        from optprof.models import bundled_models

        return cls(models=tuple(ModelListing(b.name, b.description, b.aliases) for b in bundled_models().values()))


REPORT_TYPES: dict[str, type[Report]] = {
    cls.SCHEMA: cls for cls in (StateSizeReport, CompareReport, PredictReport, TuneReport, CheckReport,
                                OptimizersReport, ModelsReport)
}


def load_report(data: Any, source: str = "the input") -> Report:
    """Any saved report, by its schema name; a UsageError naming `source` when it is not one."""
    schema = data.get("schema") if isinstance(data, dict) else None
    cls = REPORT_TYPES.get(schema) if isinstance(schema, str) else None
    if cls is None:
        known = ", ".join(REPORT_TYPES)
        raise UsageError(f"{source} is not an optprof report (schema {schema!r}; known: {known})")
    try:
        return cls.from_dict(data)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UsageError(f"{source}: a damaged {schema} report ({type(exc).__name__}: {exc})") from exc


def combined(reports: list[Report], labels: list[str]) -> Report:
    """Reports of one kind as one: every row labelled by the run it came from, the first run's settings."""
    kinds = {type(r).SCHEMA for r in reports}
    if len(kinds) > 1:
        raise UsageError(f"cannot show reports of different kinds side by side: {', '.join(sorted(kinds))}")
    parts = [r.labelled(label) for r, label in zip(reports, labels, strict=True)]
    first = parts[0]
    merged: dict[str, Any] = {first.ROWS: tuple(row for part in parts for row in part.rows())}
    if isinstance(first, CheckReport):
        merged["profiles"] = tuple(p for part in parts for p in part.profiles)  # type: ignore[attr-defined]
    return dataclasses.replace(first, **merged)


def read_report(path: Path) -> Report:
    """A report saved as JSON; a UsageError naming the file when it cannot be read or is not a report."""
    try:
        data = json.loads(read_user_file(path))
    except json.JSONDecodeError as exc:
        raise UsageError(f"'{path}' is not JSON: {exc}") from exc
    return load_report(data, f"'{path}'")


def run_labels(paths: list[Path]) -> list[str]:
    """What labels each run's rows: the file name without suffix, or the whole path where names repeat."""
    stems = [p.stem for p in paths]
    return stems if len(set(stems)) == len(stems) else [str(p) for p in paths]


def serialise(reports: list[Report], labels: list[str], fmt: str) -> str:
    """JSON (one report, or an array of them) or CSV (with a `run` column when there are several)."""
    if fmt == "json":
        if len(reports) == 1:
            return reports[0].to_json()
        return json.dumps([r.to_dict() for r in reports], indent=2) + "\n"
    if len(reports) == 1:
        return reports[0].to_csv()
    import pandas as pd

    frames = [r.to_frame().assign(run=label) for r, label in zip(reports, labels, strict=True)]
    frame = pd.concat(frames, ignore_index=True)
    return frame[["run", *[c for c in frame.columns if c != "run"]]].to_csv(index=False)


# ----------------------------------------------------------------------------------- (de)serialising


def _decode(hint: Any, value: Any) -> Any:
    """`value` (from JSON) as the type `hint` names: dataclasses, tuples and dicts of them, optionals."""
    if value is None:
        return None
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        hints = typing.get_type_hints(hint)
        known = {f.name: _decode(hints[f.name], value[f.name]) for f in dataclasses.fields(hint)
                 if f.init and f.name in value}
        return hint(**known)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _decode(inner[0], value) if len(inner) == 1 else value
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_decode(args[0], item) for item in value)
        return tuple(_decode(a, item) for a, item in zip(args, value, strict=True))
    if origin is dict and args:  # JSON keys are text: an int key comes back as int
        return {(int(key) if args[0] is int else key): _decode(args[1], item) for key, item in value.items()}
    if origin is list and args:
        return [_decode(args[0], item) for item in value]
    return value


def _flat(record: dict[str, Any]) -> dict[str, Any]:
    """CSV cells are scalars: dicts become prefixed columns, sequences ';'-joined text."""
    flat: dict[str, Any] = {}
    for key, value in record.items():
        if key == "state_dtypes":
            flat[key] = ";".join(f"{k}={v}" for k, v in value.items())
        elif isinstance(value, dict):
            flat.update({f"{key}_{k}": v for k, v in value.items()})
        elif key == "state_parts":  # name=parameters:state bytes
            flat[key] = ";".join(f"{p['name']}={p['parameters']}:{p['state_bytes']}" for p in value)
        elif key == "trials" and isinstance(value, list | tuple):  # tune: each trial's held-out loss, in order
            flat[key] = ";".join("nan" if t["val_loss"] is None else f"{t['val_loss']:.6g}" for t in value)
        elif key == "search":  # probes, compactly: micro-batch:fits or micro-batch:no
            flat[key] = ";".join(f"{p['micro_batch']}:{'fits' if p['fits'] else 'no'}" for p in value)
        elif isinstance(value, list | tuple):
            flat[key] = ";".join(str(v) for v in value)
        else:
            flat[key] = value
    return flat
