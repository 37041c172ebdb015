"""`optprof tune`: its flags -> TuneConfig -> the report."""

from __future__ import annotations

from optprof.cli.inputs import model_selection
from optprof.cli.options import (
    DEFAULT_MODEL,
    DataOpt,
    EvalSequencesOpt,
    FormatOpt,
    JobsOpt,
    MicroBatchOpt,
    ModelArg,
    NoiseSeedsOpt,
    OptArgOpt,
    OptimizerOpt,
    OutputFormat,
    OutputOpt,
    PlotOpt,
    RevisionOpt,
    SeedOpt,
    SeqLenOpt,
    SpaceOpt,
    StepsOpt,
    TrialsOpt,
    TrustOpt,
    UnitsOpt,
)
from optprof.cli.output import destination, finish
from optprof.config import Dtype, TuneBudget, TuneConfig, default_jobs, whole_number


def tune(
    model: ModelArg = DEFAULT_MODEL, optimizer: OptimizerOpt = None, trials: TrialsOpt = TuneBudget.trials,
    steps: StepsOpt = TuneBudget.steps, micro_batch: MicroBatchOpt = str(TuneBudget.micro_batch),
    seq_len: SeqLenOpt = TuneBudget.seq_len, eval_sequences: EvalSequencesOpt = TuneBudget.eval_sequences,
    noise_seeds: NoiseSeedsOpt = TuneConfig.noise_seeds, space: SpaceOpt = None, data: DataOpt = None,
    opt_arg: OptArgOpt = None, seed: SeedOpt = TuneConfig.seed, jobs: JobsOpt = None, revision: RevisionOpt = None,
    trust_remote_code: TrustOpt = False, output_format: FormatOpt = OutputFormat.TABLE, output: OutputOpt = None,
    units: UnitsOpt = None, plot: PlotOpt = None,
) -> None:
    """Quality at equal tuning budget (the optimizer study's protocol): tune each optimizer on real text.

    Each optimizer gets the same number of trials at quasi-random points of its own search space, each trained
    for the same steps on CPU from the same weights, then scored by its loss on held-out text. The best point
    is trained again with other seeds to measure the noise; the study's inclusion relations (SGD ⊆ momentum ⊆
    RMSProp / Adam, SGD ⊆ Nesterov ⊆ NAdam) are checked within it. Exit code 1 if a trial failed, 2 on bad
    input.
    """
    # every path this command writes, checked before anything is imported or loaded
    to = destination(output_format, output, units, plot)
    from optprof.optimizers.registry import parse_opt_args
    from optprof.render.console import console
    from optprof.tune.run import run_tune

    budget = TuneBudget(trials, steps, whole_number(micro_batch or str(TuneBudget.micro_batch), "--micro-batch"),
                        seq_len or TuneBudget.seq_len, eval_sequences)
    run_config = TuneConfig(
        model_selection(model, Dtype.FLOAT32, revision, trust_remote_code), tuple(optimizer or ()), budget,
        parse_opt_args(opt_arg or []), seed=seed, noise_seeds=noise_seeds, jobs=jobs or default_jobs(),
        space_file=None if space is None else str(space), data=None if data is None else str(data))
    with console(stderr=True).status(f"tuning optimizers on {model} ...") as status:
        result = run_tune(run_config, on_trial=lambda name, trial, done, total: status.update(
            f"{done}/{total} trials: {name} point {trial.index} seed {trial.seed}: {trial.status}"))
    finish(result, to)
