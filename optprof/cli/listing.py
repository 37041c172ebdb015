"""`optprof optimizers`, `models`, `recipes` and `gpus`: what optprof can profile, and on what."""

from __future__ import annotations

from optprof.cli.options import FormatOpt, GpuSpecOpt, OutputFormat, OutputOpt, StrategyColumnOpt
from optprof.cli.output import destination, finish


def optimizers(output_format: FormatOpt = OutputFormat.TABLE, output: OutputOpt = None,
               strategy: StrategyColumnOpt = None) -> None:
    """List the optimizers optprof can profile: package and version, family, available here or why not."""
    from optprof.commands.preflight import optimizers_with_support
    from optprof.render.console import console

    to = destination(output_format, output)
    with console(stderr=True).status("listing optimizers ...") as status:
        result = optimizers_with_support(strategy, lambda name: status.update(f"{name}: a fake step under {strategy}"))
    finish(result, to)


def models(output_format: FormatOpt = OutputFormat.TABLE, output: OutputOpt = None) -> None:
    """List the model configs bundled in profiles/models (usable offline, by name or hub alias)."""
    from optprof.results.reports import ModelsReport

    to = destination(output_format, output)
    finish(ModelsReport.bundled(), to)


def gpus(output_format: FormatOpt = OutputFormat.TABLE, gpu_spec: GpuSpecOpt = None) -> None:
    """List the hardware catalog (--gpu, --network): each GPU's peaks, bandwidths and efficiencies, each network's
    bandwidth and latency, every figure with its source in -f json."""
    import json

    from optprof.errors import UsageError
    from optprof.hardware.catalog import load_catalog
    from optprof.render.console import show
    from optprof.render.hardware import catalog_records, gpus_table

    catalog = load_catalog(gpu_spec)
    if output_format == OutputFormat.JSON:
        print(json.dumps(catalog_records(catalog), indent=2))
    elif output_format == OutputFormat.TABLE:
        show(gpus_table(catalog))
    else:
        raise UsageError("optprof gpus writes table or json")


def recipes(output_format: FormatOpt = OutputFormat.TABLE) -> None:
    """List the trainer recipes (--recipe): each one's settings, and the file and function in the trainer's public
    repository that each setting follows."""
    import json

    from optprof.errors import UsageError
    from optprof.render.console import console
    from optprof.render.recipes import recipe_records, recipes_table

    if output_format == OutputFormat.JSON:
        print(json.dumps(recipe_records(), indent=2))
    elif output_format == OutputFormat.TABLE:
        console().print(recipes_table())
    else:
        raise UsageError("optprof recipes writes table or json")
