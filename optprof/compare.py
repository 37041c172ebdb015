"""`optprof compare`: real training steps under each optimizer, each optimizer in a fresh process."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

from optprof.config import CompareConfig, TrainingSettings
from optprof.errors import UsageError
from optprof.measure.isolate import run_isolated
from optprof.measure.trial import TrialOutcome, TrialSpec, base_row, run_trial, trial_in_child
from optprof.models import ModelInfo, load_model
from optprof.optimizers.registry import availability, resolve_optimizers
from optprof.results import (
    STATUS_FAILED,
    STATUS_UNAVAILABLE,
    CompareReport,
    CompareRow,
    environment,
    now_iso,
)

# Default sequence length: the model's context length, capped so that a default run stays quick
# (a CPU step at 2048 tokens is minutes for a 1B model); --seq-len overrides either.
SEQ_LEN_CAP = {"cuda": 2048, "cpu": 512}
SEQ_LEN_FALLBACK = 512  # models whose config has no context length


def resolve_seq_len(requested: int | None, info: ModelInfo, device: str) -> int:
    limit = info.max_position_embeddings
    if requested is None:
        return min(limit or SEQ_LEN_FALLBACK, SEQ_LEN_CAP[device])
    if limit and requested > limit:
        raise UsageError(f"--seq-len {requested} exceeds the model's context length ({limit} positions)")
    return requested


def check_training(training: TrainingSettings, dtype: str) -> None:
    if training.amp and dtype != "float32":
        raise UsageError(f"--amp {training.amp} keeps float32 master weights: drop --dtype {dtype}")
    if training.warmup < 2:
        raise UsageError("--warmup must be at least 2: Adam-style state is allocated in the first step")


def run_compare(
    config: CompareConfig,
    on_progress: Callable[[str, str], None] | None = None,
    on_row: Callable[[CompareRow], None] | None = None,
    isolate: bool = True,
    quiet: bool = True,
) -> CompareReport:
    """One trial per optimizer, in order. `isolate=False` runs them in this process (tests only)."""
    check_training(config.training, config.model.dtype)
    entries = resolve_optimizers(list(config.optimizers))  # unknown names fail before anything is built
    selection = config.model
    info = load_model(selection.model, dtype=selection.dtype, revision=selection.revision,
                      trust_remote_code=selection.trust_remote_code).info  # on meta: checks the model, cheaply
    training = dataclasses.replace(
        config.training, seq_len=resolve_seq_len(config.training.seq_len, info, config.training.device))

    rows: list[CompareRow] = []
    device: dict = {}
    for entry in entries:
        def progress(text: str, name: str = entry.name) -> None:
            if on_progress is not None:
                on_progress(name, text)

        base = base_row(entry, config.opt_args, training)
        reason = availability(entry)
        if reason is not None:  # no process needed to say so
            row = dataclasses.replace(base, status=STATUS_UNAVAILABLE, reason=reason)
        else:
            spec = TrialSpec(selection, entry.name, training, config.opt_args)
            progress("starting")
            if isolate:
                result = run_isolated(functools.partial(trial_in_child, quiet=quiet), spec,
                                      config.trial_timeout_s, progress)
                outcome: TrialOutcome | None = result.value
                failure = result.error
            else:
                outcome, failure = run_trial(spec, progress), None
            if outcome is None:
                row = dataclasses.replace(base, status=STATUS_FAILED, reason=failure)
            else:
                row = outcome.row
                device = device or outcome.device
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return CompareReport(
        model=info,
        results=tuple(rows),
        config={
            "command": "compare",
            **dataclasses.asdict(selection),
            "optimizers": [e.name for e in entries],
            "opt_args": {k: repr(v) for k, v in config.opt_args.items()},
            **dataclasses.asdict(training),
            "trial_timeout_s": config.trial_timeout_s,
            "isolated": isolate,
        },
        environment=environment(),
        device=device,
        created=now_iso(),
    )
