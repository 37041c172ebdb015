"""`optprof report`: saved reports rendered again, alone or side by side."""

from __future__ import annotations

import typer

from optprof.cli.options import FormatOpt, OutputFormat, OutputOpt, PlotOpt, ReportFilesArg, UnitsOpt
from optprof.cli.output import file_format, plot, write


def report(files: ReportFilesArg, output_format: FormatOpt = OutputFormat.TABLE, output: OutputOpt = None,
           units: UnitsOpt = None, plot_path: PlotOpt = None) -> None:
    """Re-render saved reports: the table again, or JSON / CSV; several runs of one kind side by side."""
    from optprof.render.console import show
    from optprof.render.text import render
    from optprof.results.io import combined, read_report, run_labels, serialise
    from optprof.results.reports import ModelReport, Report

    runs = [read_report(path) for path in files]
    labels = run_labels(files)
    described = [(label, run) for label, run in zip(labels, runs, strict=True) if isinstance(run, ModelReport)]

    def shown() -> Report:
        """The runs as one report (they must be of one kind; JSON and CSV also take mixed kinds)."""
        return combined(runs, labels) if len(runs) > 1 else runs[0]

    if plot_path is not None:
        plot(shown(), plot_path, units)
    if output_format == OutputFormat.TABLE and output is None:
        show(render(shown(), units, described))
        return
    fmt = file_format(output_format, output) or output_format
    if fmt == OutputFormat.HTML:
        from optprof.render.html import html_document

        text = html_document(shown(), units, described)
    else:
        text = serialise(runs, labels, fmt)
    if output is None:
        typer.echo(text, nl=False)
    else:
        write(output, text, fmt)
