"""Result records and their serialised forms (JSON with a schema name and version, CSV via pandas).

Bytes are int and fractions are floats in [0, 1]; nothing here formats units (report.py does).
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from optprof import __version__
from optprof.search import Probe

if TYPE_CHECKING:
    import pandas as pd

    from optprof.models import ModelInfo

STATE_SIZE_SCHEMA = "optprof.state-size"
STATE_SIZE_SCHEMA_VERSION = 1
COMPARE_SCHEMA = "optprof.compare"
COMPARE_SCHEMA_VERSION = 1
PREDICT_SCHEMA = "optprof.predict"
PREDICT_SCHEMA_VERSION = 1

STATUS_OK = "ok"
STATUS_FAILED = "failed"  # the optimizer ran here and broke: a real problem, exit code 1
STATUS_UNAVAILABLE = "unavailable"  # cannot run on this machine (package missing): not an error
STATUS_OOM = "oom"  # ran out of device memory at this micro-batch: a finding, not an error
STATUS_NO_FIT = "does not fit"  # --micro-batch auto: not even micro-batch 1 fits the memory limit

# The categories of a peak's breakdown (CompareRow.breakdown, PredictRow.predicted_breakdown), in table order.
BREAKDOWN_KEYS = ("parameters", "gradients", "optimizer_state", "activations", "temporaries")

# Which figure a compare row's peak_bytes is (the best one for the device).
PEAK_TORCH_RESERVED = "torch_max_reserved"  # CUDA: what the caching allocator held, exact
PEAK_TENSOR = "tensor_peak"  # CPU: live tensor bytes at the peak, from torch's MemTracker
PEAK_RSS = "rss_peak"  # CPU without the tracked step: sampled, overstates (the C allocator keeps freed memory)

# How a state figure was obtained (StateSizeRow.method).
METHOD_META_STEP = "meta step"
METHOD_META_PLACEHOLDERS = "meta step, placeholder scalars"  # value reads answered by a placeholder
METHOD_FSDP_FAKE = "FSDP2 on fake tensors, fake process group"  # --gpus N: real sharding, no memory

ENVIRONMENT_PACKAGES = (
    "torch", "transformers", "adam-mini", "pytorch-optimizer", "bitsandbytes", "torchao",
    "nvidia-ml-py", "psutil", "pandas", "typer", "rich",
)


@dataclass(frozen=True)
class StateSizeRow:
    optimizer: str
    package: str
    package_version: str | None
    family: str
    status: str
    reason: str | None = None
    state_bytes: int | None = None
    bytes_per_param: float | None = None
    ratio_vs_adamw: float | None = None
    saving_vs_adamw: float | None = None  # 1 - ratio
    state_dtypes: dict[str, int] = field(default_factory=dict)  # dtype -> bytes
    state_tensors: int | None = None  # distinct storages
    second_moment_entries: int | None = None  # adaptive "learning rates"; None if not adaptive
    second_moment_removed: float | None = None  # share of Adam's one-per-parameter removed
    method: str | None = None  # how the state was obtained, e.g. "meta step"
    settings: str | None = None  # memory-relevant settings in effect, e.g. GaLore's rank
    world_size: int = 1  # --gpus N: state_bytes is then one rank's (rank 0), sharded by FSDP2
    state_logical_bytes: int | None = None  # the unsharded size of that state (DTensor global shapes)


@dataclass(frozen=True)
class StateSizeReport:
    model: ModelInfo
    reference_state_bytes: int | None  # AdamW's, measured in the same run
    results: tuple[StateSizeRow, ...]
    config: dict[str, Any]
    environment: dict[str, Any]
    created: str
    schema: str = STATE_SIZE_SCHEMA
    schema_version: int = STATE_SIZE_SCHEMA_VERSION

    @property
    def failed(self) -> bool:
        return any_failed(self.results)


@dataclass(frozen=True)
class RankFigures:
    """One rank of a distributed trial (`--gpus N`)."""

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


@dataclass(frozen=True)
class CompareRow:
    """One optimizer's trial. Times are per optimizer step (all micro-batches), in seconds."""

    optimizer: str
    package: str
    package_version: str | None
    family: str
    status: str
    reason: str | None = None
    settings: str | None = None
    micro_batch: int | None = None
    seq_len: int | None = None
    grad_accum: int | None = None
    world_size: int = 1
    steps: int | None = None  # timed steps
    tokens_per_s: float | None = None  # global: micro_batch * seq_len * grad_accum * world_size / step_s_p50
    step_s_p50: float | None = None
    step_s_p90: float | None = None
    forward_s: float | None = None  # means over the timed steps
    backward_s: float | None = None
    clip_s: float | None = None
    optimizer_s: float | None = None  # optimizer.step() and zero_grad()
    optimizer_share: float | None = None  # optimizer_s / mean step time
    model_flops_per_token: float | None = None  # PaLM formula: 6 per matmul weight + attention
    mfu: float | None = None  # model FLOPs utilisation; None when the device's peak is unknown
    state_bytes: int | None = None  # measured on the live optimizer, as state-size does
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
    loss_first: float | None = None
    loss_last: float | None = None
    losses: tuple[float, ...] = ()  # every step's loss, warm-up and tracked step included (a sanity trace)
    step_times_s: tuple[float, ...] = ()
    sampler_samples: int | None = None
    notes: tuple[str, ...] = ()  # what could not be measured here, and why
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


@dataclass(frozen=True)
class CompareReport:
    model: ModelInfo
    results: tuple[CompareRow, ...]
    config: dict[str, Any]
    environment: dict[str, Any]
    device: dict[str, Any]  # the device the trials ran on, as a trial process saw it
    created: str
    schema: str = COMPARE_SCHEMA
    schema_version: int = COMPARE_SCHEMA_VERSION

    @property
    def failed(self) -> bool:
        return any_failed(self.results)


@dataclass(frozen=True)
class PredictRow:
    """One optimizer's prediction. Every `predicted_` figure comes from fake tensors, not from a device."""

    optimizer: str
    package: str
    package_version: str | None
    family: str
    status: str
    reason: str | None = None
    settings: str | None = None
    micro_batch: int | None = None
    seq_len: int | None = None
    grad_accum: int | None = None
    world_size: int = 1
    state_bytes: int | None = None  # per device; exact: the real optimizer's state, on fake tensors
    predicted_peak_bytes: int | None = None  # live tensors at the peak, per device, at micro_batch
    predicted_device_bytes: int | None = None  # the peak plus the reserve: what the card must hold
    predicted_breakdown: dict[str, int] = field(default_factory=dict)
    predicted_max_micro_batch: int | None = None  # under the device memory given (0: not even 1)
    predicted_max_capped: bool | None = None
    trials: int | None = None  # fake steps the search took
    predicted_peak_at_max_bytes: int | None = None
    predict_s: float | None = None  # wall time of this optimizer's prediction


@dataclass(frozen=True)
class PredictReport:
    model: ModelInfo
    results: tuple[PredictRow, ...]
    config: dict[str, Any]
    assumptions: tuple[str, ...]  # what fake CPU tensors cannot see, and what was assumed instead
    environment: dict[str, Any]
    created: str
    schema: str = PREDICT_SCHEMA
    schema_version: int = PREDICT_SCHEMA_VERSION

    @property
    def failed(self) -> bool:
        return any_failed(self.results)


Report = StateSizeReport | CompareReport | PredictReport


def any_failed(rows: Any) -> bool:
    """Whether a report should exit 1: an optimizer broke (unavailable, oom and does-not-fit are findings)."""
    return any(row.status == STATUS_FAILED for row in rows)


def command_config(command: str, selection: Any, optimizers: list[str], opt_args: dict[str, Any]) -> dict[str, Any]:
    """The head of every report's `config`: the command, the model selection, the optimizers and their args."""
    return {
        "command": command,
        **dataclasses.asdict(selection),
        "optimizers": optimizers,
        "opt_args": {k: repr(v) for k, v in opt_args.items()},
    }


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


def to_dict(report: Report) -> dict[str, Any]:
    body = dataclasses.asdict(report)
    ordered = {"schema": body.pop("schema"), "schema_version": body.pop("schema_version")}
    ordered.update(body)
    return ordered


def to_json(report: Report) -> str:
    return json.dumps(to_dict(report), indent=2) + "\n"


def _flat(record: dict[str, Any]) -> dict[str, Any]:
    """CSV cells are scalars: dicts become prefixed columns, sequences ';'-joined text."""
    flat: dict[str, Any] = {}
    for key, value in record.items():
        if key == "state_dtypes":
            flat[key] = ";".join(f"{k}={v}" for k, v in value.items())
        elif isinstance(value, dict):
            flat.update({f"{key}_{k}": v for k, v in value.items()})
        elif key == "search":  # probes, compactly: micro-batch:fits or micro-batch:no
            flat[key] = ";".join(f"{p['micro_batch']}:{'fits' if p['fits'] else 'no'}" for p in value)
        elif isinstance(value, list | tuple):
            flat[key] = ";".join(str(v) for v in value)
        else:
            flat[key] = value
    return flat


def to_frame(report: Report) -> pd.DataFrame:
    """One row per optimizer, model columns repeated, so several runs concatenate into one table."""
    import pandas as pd

    rows = []
    for row in report.results:
        record = {
            "model": report.model.name,
            "dtype": report.model.dtype,
            "params": report.model.params,
            "embedding_params": report.model.embedding_params,
            "embedding_fraction": report.model.embedding_fraction,
        }
        record.update(dataclasses.asdict(row))
        rows.append(_flat(record))
    return pd.DataFrame(rows)


def to_csv(report: Report) -> str:
    return to_frame(report).to_csv(index=False)
