"""`optprof tune`: the optimizer study's protocol, runnable. Every optimizer gets the same number of trials at
quasi-random points of its own search space, each trained the same way on real text; the best held-out loss of
each, its noise (the best point re-run with other seeds), the study's inclusion checks within that noise, and
the ranking as the budget grows, next to each optimizer's tokens/s and state bytes from the same trials.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from optprof.config import DEFAULT_TUNE_OPTIMIZERS, TuneConfig
from optprof.errors import UsageError
from optprof.interrupts import Interrupted, stop_children
from optprof.model.loading import load_selection
from optprof.optimizers.registry import (
    INCLUSION_CHAINS,
    REGISTRY,
    OptimizerEntry,
    availability,
    check_opt_args,
    resolve_optimizers,
)
from optprof.processes.forked import run_each, torch_threads
from optprof.results.reports import TuneReport, command_config
from optprof.results.rows import TuneRow, TuneTrial, interrupted_row
from optprof.results.vocab import Status
from optprof.tune.conclusions import (
    best_of,
    inclusion_checks,
    inclusion_pairs,
    noise_range,
    ranking_by_budget,
    trial_figures,
    usable,
)
from optprof.tune.corpus import Corpus, load_corpus
from optprof.tune.space import read_space_file, resolve_space, sample
from optprof.tune.trial import TuneTrialSpec, run_tune_trial

OnTrial = Callable[[str, TuneTrial, int, int], None]  # optimizer, trial, trials done, trials in this round

WORKER_DIED = "its worker process died (on a CPU most often killed for host memory)"


def run_tune(config: TuneConfig, on_trial: OnTrial | None = None) -> TuneReport:
    """All trials (in forked single-threaded workers, `config.jobs` at once), then the best of each optimizer
    again with other seeds, then the figures drawn from them."""
    _check(config)
    entries = resolve_optimizers(list(config.optimizers or DEFAULT_TUNE_OPTIMIZERS))
    check_opt_args(entries, config.opt_args)
    overrides = read_space_file(Path(config.space_file), set(REGISTRY)) if config.space_file else {}
    spaces = {e.name: resolve_space(e.name, overrides) for e in entries}
    declared = load_selection(config.model)  # on meta: checks the model, and gives its vocabulary
    data = Path(config.data).expanduser() if config.data else None
    corpus = load_corpus(config.model.model, data, declared.info.vocab_size, config.budget.seq_len)
    model_overrides = byte_vocabulary(declared.config, corpus.info.vocab_size) if corpus.info.tokenizer == "bytes" \
        else {}
    # The model as it trains: rebuilt on meta only where the byte vocabulary changed it.
    info = load_selection(config.model, overrides=model_overrides).info if model_overrides else declared.info

    runnable = [e for e in entries if availability(e) is None]
    points = {e.name: sample(spaces[e.name], config.budget.trials, config.seed, e.name) for e in runnable}

    def spec(entry: OptimizerEntry, index: int, seed: int) -> TuneTrialSpec:
        return TuneTrialSpec(config.model, entry, points[entry.name][index], index, seed, config.budget,
                             config.opt_args, model_overrides)

    # Interleaved (every optimizer's first point, then every second...), so all optimizers share the machine alike.
    first_specs = [spec(e, i, config.seed) for i in range(config.budget.trials) for e in runnable]
    first: list[tuple[TuneTrialSpec, TuneTrial]] = []
    reruns: list[tuple[TuneTrialSpec, TuneTrial]] = []
    interrupted: str | None = None
    try:
        _run_trials(first_specs, corpus, config.jobs, on_trial, first)
        best = {e.name: best_of(_in_order(first, e)) for e in runnable}
        noise_specs = [spec(e, best[e.name].index, config.seed + k)  # type: ignore[union-attr]
                       for e in runnable if best[e.name] is not None for k in range(1, config.noise_seeds + 1)]
        _run_trials(noise_specs, corpus, config.jobs, on_trial, reruns)
    except Interrupted as stop:  # keep the optimizers whose every trial finished
        stop_children()
        interrupted = str(stop)
    rows = []
    for e in entries:
        trials = _in_order(first, e)
        mine = sorted((t for s, t in reruns if s.entry is e), key=lambda t: t.seed)
        found = best_of(trials)
        whole = len(trials) == config.budget.trials and (found is None or len(mine) == config.noise_seeds)
        if interrupted is not None and availability(e) is None and not whole:
            rows.append(interrupted_row(TuneRow(**e.row_head(config.opt_args), status=Status.OK), interrupted))
        else:
            rows.append(_row(e, config, spaces, trials, found, mine))
    return TuneReport(model=info, config=_report_config(config, entries), results=tuple(rows), interrupted=interrupted,
                      inclusion=inclusion_checks(rows, inclusion_pairs(INCLUSION_CHAINS)),
                      ranking_by_budget=ranking_by_budget(rows), corpus=corpus.info,
                      notes=_notes(config, corpus))


SPECIAL_TOKENS = ("pad_token_id", "bos_token_id", "eos_token_id")


def byte_vocabulary(model_config: Any, vocab: int) -> dict[str, Any]:
    """Config overrides for a model trained on bytes: the vocabulary, and no special token past its end (an
    embedding's padding index must lie inside it)."""
    overrides: dict[str, Any] = {"vocab_size": vocab}
    for part in (model_config, model_config.get_text_config()):
        for key in SPECIAL_TOKENS:
            value = getattr(part, key, None)
            ids = value if isinstance(value, list | tuple) else [value]
            if any(isinstance(i, int) and i >= vocab for i in ids):
                overrides[key] = None
    return overrides


def _check(config: TuneConfig) -> None:
    budget = config.budget
    for name, value, least in (("--trials", budget.trials, 1), ("--steps", budget.steps, 1),
                               ("--micro-batch", budget.micro_batch, 1), ("--eval-sequences", budget.eval_sequences, 1),
                               ("--seq-len", budget.seq_len, 2)):  # one token has no next token to predict
        if value < least:
            raise UsageError(f"{name} must be at least {least}, got {value}")
    if config.noise_seeds < 0:
        raise UsageError(f"--noise-seeds must be 0 or more, got {config.noise_seeds}")


def _in_order(found: list[tuple[TuneTrialSpec, TuneTrial]], entry: OptimizerEntry) -> list[TuneTrial]:
    """`entry`'s trials in the order of their points (they arrive in the order they finish)."""
    return sorted((t for s, t in found if s.entry is entry), key=lambda t: t.index)


def _run_trials(specs: list[TuneTrialSpec], corpus: Corpus, jobs: int, on_trial: OnTrial | None,
                kept: list[tuple[TuneTrialSpec, TuneTrial]]) -> None:
    """Each spec's trial into `kept`, as each finishes (an interrupt keeps those); a trial whose worker died
    becomes a failed trial."""
    done: list[int] = []

    def work(index: int) -> TuneTrial:
        return run_tune_trial(specs[index], corpus.train, corpus.held_out)

    def arrived(index: int, trial: TuneTrial) -> None:
        done.append(index)
        kept.append((specs[index], trial))
        if on_trial is not None:
            on_trial(specs[index].entry.name, trial, len(done), len(specs))

    def died(index: int) -> TuneTrial:
        spec = specs[index]
        return TuneTrial(index=spec.index, hyperparameters=spec.hyperparameters, seed=spec.seed,
                         status=Status.FAILED, reason=WORKER_DIED)

    with torch_threads(1):  # forked workers or, without fork, here: each trial on one thread, the same numbers
        trials = run_each(lambda index, here: work(index), len(specs), jobs, died, arrived, always_fork=True)
    arrived_ids = set(done)
    kept.extend((specs[index], trial) for index, trial in enumerate(trials) if index not in arrived_ids)  # died


def _row(entry: OptimizerEntry, config: TuneConfig, spaces: dict, trials: list[TuneTrial], best: TuneTrial | None,
         reruns: list[TuneTrial]) -> TuneRow:
    head = entry.row_head(config.opt_args)
    space = {h.name: h.describe() for h in spaces[entry.name]}
    reason = availability(entry)
    if reason is not None:
        return TuneRow(**head, status=Status.UNAVAILABLE, reason=reason, space=space)
    status, why = _status(trials)
    return TuneRow(**head, status=status, reason=why, space=space, trials=tuple(trials), **trial_figures(trials),
                   noise_val_losses=tuple(r.val_loss for r in reruns if r.val_loss is not None),
                   noise_seeds=tuple(r.seed for r in reruns), noise_range=noise_range(best, reruns),
                   noise_diverged=sum(1 for r in reruns if not usable(r)))


def _status(trials: list[TuneTrial]) -> tuple[Status, str | None]:
    """ok where a trial trained; failed where any trial broke (the others' figures stay); else the trials'
    own status (unsupported, oom), with the first one's reason."""
    broken = next((t for t in trials if t.status == Status.FAILED), None)
    if broken is not None:
        return Status.FAILED, f"trial {broken.index}: {broken.reason}"
    if any(t.status == Status.OK for t in trials) or not trials:
        return Status.OK, None
    return trials[0].status, trials[0].reason


def _report_config(config: TuneConfig, entries: list[OptimizerEntry]) -> dict:
    return {**command_config("tune", config.model, [e.name for e in entries], config.opt_args),
            **dataclasses.asdict(config.budget), "seed": config.seed, "noise_seeds": config.noise_seeds,
            "jobs": config.jobs, "space_file": config.space_file, "data": config.data}


def _notes(config: TuneConfig, corpus: Corpus) -> tuple[str, ...]:
    b, c = config.budget, corpus.info
    seeds = f"{config.seed + 1}" + (f"..{config.seed + config.noise_seeds}" if config.noise_seeds > 1 else "")
    tokens = "bytes (vocabulary 256)" if c.tokenizer == "bytes" else f"the tokenizer in {c.tokenizer}"
    return (
        f"every trial: weights and batches from seed {config.seed} (the same for every optimizer), {b.steps} steps "
        f"of {b.micro_batch} x {b.seq_len} tokens at a constant learning rate (no warm-up, decay or clipping)",
        f"held-out loss: mean next-token loss in nats per token over {b.eval_sequences} windows of {b.seq_len} "
        f"tokens spread evenly over {c.held_out_documents} held-out documents; tokens: {tokens}",
        "diverged: a training loss that is not finite (the trial stops there) or a held-out loss above the first "
        "training loss; such a trial is never the best, and the ranking by budget counts it at its first loss",
        f"noise: each optimizer's best point trained again with seed{'s' if config.noise_seeds > 1 else ''} {seeds}"
        " (other weights and batches); an inclusion holds when the general optimizer's best is at most the special "
        "case's plus the larger of their two noise ranges" if config.noise_seeds else
        "no noise re-runs (--noise-seeds 0): inclusion checks use no margin",
        f"tokens/s: each trial in one single-threaded worker, {config.jobs} at once; compare them within this run",
        "state: what the optimizer keeps after its last step, counted as state-size counts it, on the model as "
        f"trained here (vocabulary {c.vocab_size})",
    )
