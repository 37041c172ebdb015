"""Decisions made on fake tensors before `compare` launches anything, in this process, allocating nothing:

- support: can the optimizer's own code run where the strategy puts the parameters (DTensor shards under
  FSDP2, a share of whole parameters under zero1)? One fake step of a shallow copy of the model (its first
  layers, every kind of layer and module included) over a fake process group. `optprof optimizers --strategy S`
  shows the same decision for every registered optimizer, cached per installed versions.
- fit: can the step fit at all? The predicted per-rank peak against what the device holds; far over it, the row
  is `does not fit` and no process is launched (a CPU trial of a 7B model would be killed by the kernel).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optprof.commands.predict import predict_outcome
from optprof.config import (
    SHARDED_STRATEGIES,
    CompareConfig,
    DeviceKind,
    ModelSelection,
    PredictConfig,
    Strategy,
    TrainingSettings,
    cache_dir,
    default_reserve,
)
from optprof.files import read_cache, write_whole
from optprof.measure.nvml import open_backend, smallest_visible_card
from optprof.measure.trial import base_row
from optprof.model.layer_copies import representative_layers
from optprof.optimizers.registry import REGISTRY, OptimizerEntry, availability, optimizers_report, package_version
from optprof.results.reports import OptimizersReport
from optprof.results.rows import CompareRow, PredictRow
from optprof.results.vocab import Status, Support

SUPPORT_SEQ_LEN = 16  # tokens: one step through every layer; whether an optimizer runs does not depend on length
SUPPORT_RANKS = 4  # fake ranks for `optprof optimizers --strategy S`
SUPPORT_SHARD_SIZE = 2  # hsdp there: 2 replicas x 2 shards, a real 2-D mesh
SUPPORT_MODEL = "demo"  # the bundled model `optprof optimizers --strategy S` decides on (a small Llama)
FIT_MARGIN = 1.10  # a predicted need over 110% of what is available clearly cannot fit: nothing is launched


# A fake step's row status as a support verdict; anything else (an OOM on fake tensors, say) is a failure.
SUPPORT_OF = {Status.OK: Support.OK, Status.UNSUPPORTED: Support.UNSUPPORTED, Status.UNAVAILABLE: Support.UNAVAILABLE}


def check_support(selection: ModelSelection, entry: OptimizerEntry, strategy: Strategy, ranks: int,
                  shard_size: int | None, opt_args: Mapping[str, Any], layers: int | None,
                  step: TrainingSettings | None = None) -> tuple[Support, str | None]:
    """(status, reason) of one fake step of the model's first `layers` layers over `ranks` fake ranks under
    `strategy`: ok, unsupported (the optimizer's own code refused, with its reason), failed, or undecided.
    `step`: the run's training step (precision, checkpointing, loss), kept; its sizes are the check's own."""
    training = dataclasses.replace(step or TrainingSettings(), device=DeviceKind.CPU, seq_len=SUPPORT_SEQ_LEN,
                                   micro_batch=1, grad_accum=1, breakdown=False)
    config = PredictConfig(selection, (entry.name,), training, dict(opt_args), gpus=ranks, strategy=strategy,
                           shard_size=shard_size, layers=layers)
    row, values_read = predict_outcome(config, entry, training, lambda _: None)
    if values_read:
        return Support.UNDECIDED, row.reason
    return SUPPORT_OF.get(row.status, Support.FAILED), row.reason


# ------------------------------------------------------------------------------------------ support matrix


def _support_cache_file(strategy: Strategy) -> Path:
    """One file per strategy, set of installed versions and optprof source: a new torch, transformers or
    optimizer package, or a changed builder or training step (same optprof version), gets a fresh decision."""
    packages = sorted({"torch", "transformers", "optprof", *(entry.package for entry in REGISTRY.values())})
    key = json.dumps({"strategy": strategy, "ranks": SUPPORT_RANKS, "shard": SUPPORT_SHARD_SIZE,
                      "model": SUPPORT_MODEL, "versions": {name: package_version(name) for name in packages},
                      "source": source_digest()}, sort_keys=True)
    return cache_dir() / f"support-{strategy}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def source_digest() -> str:
    """A digest of optprof's own source (the builders and the training step decide support too)."""
    files = sorted(Path(__file__).parent.parent.rglob("*.py"))  # the whole optprof package
    return hashlib.sha256(b"".join(path.read_bytes() for path in files)).hexdigest()


def _read_cache(path: Path) -> dict[str, dict[str, Any]]:
    return read_cache(path)  # none yet, or damaged (one warning): decide again


def support_matrix(strategy: Strategy, on_progress: Callable[[str], None] | None = None,
                   ) -> dict[str, tuple[Support, str | None]]:
    """name -> (status, reason) for every registered optimizer under `strategy` on SUPPORT_RANKS fake ranks."""
    path = _support_cache_file(strategy)
    cached = _read_cache(path)
    verdicts: dict[str, tuple[Support, str | None]] = {}
    for entry in REGISTRY.values():
        reason = availability(entry)
        if reason is not None:
            verdicts[entry.name] = (Support.UNAVAILABLE, reason)
            continue
        if cached.get(entry.name, {}).get("status") not in set(Support):  # none yet, or from another vocabulary
            if on_progress is not None:
                on_progress(entry.name)
            status, why = check_support(ModelSelection(SUPPORT_MODEL), entry, strategy, SUPPORT_RANKS,
                                        SUPPORT_SHARD_SIZE if strategy == Strategy.HSDP else None, {}, None)
            cached[entry.name] = {"status": status, "reason": why}
        verdicts[entry.name] = (Support(cached[entry.name]["status"]), cached[entry.name]["reason"])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_whole(path, json.dumps(cached, indent=1, sort_keys=True).encode())
    except OSError:  # a read-only home: the decisions still stand, they are only not kept
        pass
    return verdicts


def optimizers_with_support(strategy: Strategy | None,
                            on_progress: Callable[[str], None] | None = None) -> OptimizersReport:
    """`optprof optimizers`, with a column saying which optimizers run under `strategy` when one is given."""
    report = optimizers_report()
    if strategy is None:
        return report
    verdicts = support_matrix(strategy, on_progress)
    rows = tuple(dataclasses.replace(row, support=verdicts[row.name][0], support_reason=verdicts[row.name][1])
                 for row in report.optimizers)
    return dataclasses.replace(report, optimizers=rows, strategy=strategy, support_ranks=SUPPORT_RANKS,
                               support_shard_size=SUPPORT_SHARD_SIZE if strategy == Strategy.HSDP else None,
                               support_model=SUPPORT_MODEL)


# --------------------------------------------------------------------------------------------------- fit


@dataclass(frozen=True)
class Capacity:
    """What one rank may use, and where that figure comes from (said in the row's reason)."""

    bytes: int
    source: str


def capacity(training: TrainingSettings, ranks: int) -> Capacity | None:
    """--memory-limit; else on a CPU the host's available memory shared among the ranks; else the smallest
    visible card, less the reserve tensors do not show. None where it cannot be known (no NVML)."""
    if training.memory_limit_bytes is not None:
        return Capacity(training.memory_limit_bytes, "--memory-limit")
    if training.device == DeviceKind.CPU:
        import psutil

        shared = f" shared by {ranks} ranks" if ranks > 1 else ""
        return Capacity(psutil.virtual_memory().available // ranks, f"the host memory available now{shared}")
    backend, _ = open_backend()
    if backend is None:
        return None
    try:
        card = smallest_visible_card(backend, os.environ.get("CUDA_VISIBLE_DEVICES"))
    finally:
        backend.shutdown()
    if card is None:
        return None
    return Capacity(card - default_reserve(DeviceKind.CUDA), "the card's memory less the CUDA reserve")


def rank_peak_lower_bound(row: PredictRow, strategy: Strategy | None, ranks: int) -> int | None:
    """Rank 0's predicted peak. For the replicated strategies it was predicted on one device, which bounds the
    rank's need from below: DDP adds its gradient buckets, and under zero1 the busiest rank holds at least
    its equal share of the state."""
    if row.predicted_peak_bytes is None:
        return None
    if strategy == Strategy.ZERO1 and ranks > 1:
        return row.predicted_peak_bytes - (row.state_bytes or 0) * (ranks - 1) // ranks
    return row.predicted_peak_bytes


def clearly_over(need_bytes: int, available: Capacity) -> bool:
    return need_bytes > FIT_MARGIN * available.bytes



# ----------------------------------------------------------------------------------- compare, before launch


def needs_support_check(config: CompareConfig) -> bool:
    """Whether compare decides support before launching: spawned ranks that split the parameters."""
    return config.preflight and config.gpus > 1 and not config.torchrun and config.strategy != Strategy.DDP


def shallow_layers(config: CompareConfig, model_config: Any) -> int | None:
    """The layers of the shallow copy that support is decided on; None where compare decides no support."""
    if not needs_support_check(config):
        return None
    return representative_layers(model_config, config.model.trust_remote_code)


def _decided_row(config: CompareConfig, entry: OptimizerEntry, training: TrainingSettings, **figures: Any
                 ) -> CompareRow:
    distributed = config.gpus > 1 or config.torchrun
    return dataclasses.replace(base_row(entry, config.opt_args, training), world_size=config.gpus,
                               strategy=config.strategy if distributed else None, **figures)


def unsupported_row(config: CompareConfig, entry: OptimizerEntry, training: TrainingSettings, layers: int | None,
                    ) -> CompareRow | None:
    """The `unsupported` row when a fake step of the shallow copy shows that the optimizer's own code cannot
    run under the strategy; None where it ran, or where only a real run can tell."""
    if layers is None:
        return None
    status, reason = check_support(config.model, entry, config.strategy, config.gpus, config.shard_size,
                                   config.opt_args, layers, training)
    if status != Support.UNSUPPORTED:
        return None
    note = (f"decided before launching any rank, by one step of the model's first {layers} layer(s) on fake tensors "
            "over a fake process group; --no-preflight launches it anyway")
    return _decided_row(config, entry, training, status=Status.UNSUPPORTED, reason=reason, notes=(note,))


def no_fit_row(config: CompareConfig, entry: OptimizerEntry, training: TrainingSettings,
               prediction: Callable[[], PredictRow | None]) -> CompareRow | None:
    """The `does not fit` row when the predicted per-rank need at the first micro-batch tried is clearly over
    what a rank may use; None where it may fit (or cannot be known), and the trial runs as usual.
    `prediction` gives the predicted row only when asked (on one device for the replicated strategies: see
    `rank_peak_lower_bound`), so nothing is predicted where there is nothing to judge."""
    if not config.preflight or config.torchrun:
        return None
    available = capacity(training, config.gpus)
    if available is None:
        return None
    row = prediction()
    # live tensors: the capacity already leaves out what tensors do not show (the CUDA reserve)
    need = None if row is None else rank_peak_lower_bound(row, config.strategy, config.gpus)
    if need is None or not clearly_over(need, available):
        return None
    bound = " (at least: predicted on one device)" if config.gpus > 1 and config.strategy not in SHARDED_STRATEGIES \
        else ""
    reason = (f"predicted before launching: the step's per-rank need at micro-batch {training.micro_batch}{bound} is "
              f"over {FIT_MARGIN:.0%} of {available.source}, so no trial was launched (--no-preflight launches it)")
    return _decided_row(config, entry, training, status=Status.NO_FIT, reason=reason, predicted_peak_bytes=need,
                        memory_limit_bytes=available.bytes, short_by_bytes=need - available.bytes)
