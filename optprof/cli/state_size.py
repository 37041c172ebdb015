"""`optprof state-size`: its flags -> StateSizeConfig -> the report."""

from __future__ import annotations

from optprof.cli.inputs import fake_ranks, loaded_dtype, model_selection, one_device
from optprof.cli.options import (
    DEFAULT_MODEL,
    AttentionOpt,
    FormatOpt,
    FreezeOpt,
    FullModelOpt,
    GpusOpt,
    JobsOpt,
    LoraOpt,
    ModelArg,
    OptArgOpt,
    OptimizerOpt,
    OutputFormat,
    OutputOpt,
    PlotOpt,
    QloraOpt,
    RecipeDtypeOpt,
    RecipeOpt,
    RevisionOpt,
    SaveProfileOpt,
    ShardSizeOpt,
    StrategyOpt,
    TrustOpt,
    UnitsOpt,
)
from optprof.cli.output import destination, finish
from optprof.config import StateSizeConfig, default_jobs
from optprof.trainers import recipe_dtype


def state_size(
    model: ModelArg = DEFAULT_MODEL, optimizer: OptimizerOpt = None, opt_arg: OptArgOpt = None,
    dtype: RecipeDtypeOpt = None, recipe: RecipeOpt = None, revision: RevisionOpt = None,
    trust_remote_code: TrustOpt = False,
    output_format: FormatOpt = OutputFormat.TABLE, output: OutputOpt = None, units: UnitsOpt = None,
    plot: PlotOpt = None, jobs: JobsOpt = None, save_profile: SaveProfileOpt = None,
    gpus: GpusOpt = StateSizeConfig.gpus, strategy: StrategyOpt = StateSizeConfig.strategy,
    shard_size: ShardSizeOpt = None, full_model: FullModelOpt = StateSizeConfig.full_model, lora: LoraOpt = None,
    qlora: QloraOpt = None, freeze: FreezeOpt = None, attention: AttentionOpt = None,
) -> None:
    """Exact optimizer-state bytes per optimizer, measured on the real optimizer over a meta-device model.

    No GPU and no weights needed: the model is built from its config on the meta device, every parameter
    gets a meta gradient, each optimizer takes one real step, and everything it keeps is added up.
    Exit code 1 if an optimizer failed, 2 on bad input.
    """
    # every path this command writes, checked before anything is imported or loaded
    to = destination(output_format, output, units, plot, save_profile)
    from optprof.commands.state_size import run_state_size
    from optprof.optimizers.registry import parse_opt_args
    from optprof.render.console import console

    fake = fake_ranks(gpus, strategy, shard_size, "state-size")
    # the state follows the parameters, stored as the recipe's trainer stores them
    stored = recipe_dtype(recipe, dtype, lambda: loaded_dtype(model, revision, trust_remote_code))
    run_config = StateSizeConfig(
        model_selection(model, stored, revision, trust_remote_code, lora, freeze, qlora, attention),
        tuple(optimizer or ()), parse_opt_args(opt_arg or []), jobs=jobs or default_jobs(), gpus=fake.ranks,
        strategy=fake.strategy, shard_size=fake.shard_size, full_model=full_model)
    one_device(fake.ranks, save_profile)
    with console(stderr=True).status(f"measuring optimizer state for {model} ...") as status:
        result = run_state_size(run_config, on_row=lambda row: status.update(f"measured {row.optimizer}"))
    finish(result, to, save_profile, "state-size")
