"""Reports leave here: a table on the terminal, JSON / CSV / HTML to stdout or a file, a plot, a profile; then
the exit code (1 when a row failed)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from optprof.cli.options import OutputFormat
from optprof.errors import UsageError
from optprof.files import check_writable, write_whole
from optprof.units import Unit

if TYPE_CHECKING:
    from optprof.results.profiles import Command
    from optprof.results.reports import Report


def file_format(output_format: OutputFormat, output: Path | None) -> OutputFormat | None:
    """The format of --output: --format when it names one, else the file's suffix; None without --output."""
    if output is None:
        return None
    if output_format != OutputFormat.TABLE:
        return output_format
    suffix = output.suffix.lower().lstrip(".")
    if suffix not in (OutputFormat.JSON, OutputFormat.CSV, OutputFormat.HTML):
        raise UsageError(f"cannot tell the format of '{output}': use a .json, .csv or .html name, or --format")
    return OutputFormat(suffix)


def save(path: Path, data: bytes) -> None:
    """Write `data` to `path` whole; a path that cannot be written is the user's one-line error."""
    try:
        write_whole(path, data)
    except OSError as exc:
        raise UsageError(f"cannot write '{path}': {exc.strerror or exc}") from exc


def write(path: Path, text: str, what: str) -> None:
    from optprof.render.console import console

    save(path, text.encode())
    console(stderr=True).print(f"wrote {what} to {path}", soft_wrap=True)  # a long path stays one line


def serialised(result: Report, fmt: OutputFormat, units: Unit | None) -> str:
    if fmt == OutputFormat.HTML:
        from optprof.render.html import html_document

        return html_document(result, units)
    return result.to_json() if fmt == OutputFormat.JSON else result.to_csv()


def plot(result: Report, path: Path, units: Unit | None) -> None:
    from optprof.render.console import console
    from optprof.render.plots import plot_png
    from optprof.results.reports import ModelReport

    if not isinstance(result, ModelReport):
        raise UsageError("--plot draws state-size, compare, predict and tune reports")
    save(path, plot_png(result, units))
    console(stderr=True).print(f"wrote plot {path}", soft_wrap=True)


@dataclass(frozen=True)
class Destination:
    """Where a report goes, checked before the command runs (a bad --output name fails in a second, not after
    the run)."""

    output_format: OutputFormat
    output: Path | None = None
    file_format: OutputFormat | None = None  # the format of `output`
    units: Unit | None = None
    plot: Path | None = None


def destination(output_format: OutputFormat, output: Path | None, units: Unit | None = None,
                plot_path: Path | None = None, save_profile: Path | None = None) -> Destination:
    """Where the report goes, every path checked before any work (one line, exit 2)."""
    for path, flag in ((output, "--output"), (plot_path, "--plot"), (save_profile, "--save-profile")):
        if path is not None:
            check_writable(path, flag)
    return Destination(output_format, output, file_format(output_format, output), units, plot_path)


def finish(result: Report, to: Destination, save_profile: Path | None = None, command: Command | None = None) -> None:
    """Table to the terminal, data to stdout, or data to --output (the table still shown); the plot; the
    profile; then exit 1 if a row failed."""
    from optprof.render.console import console, show
    from optprof.render.text import render
    from optprof.results.reports import ModelReport

    if to.plot is not None:
        plot(result, to.plot, to.units)
    if to.output is not None and to.file_format is not None:
        write(to.output, serialised(result, to.file_format, to.units), to.file_format)
    if to.output_format == OutputFormat.TABLE:
        show(render(result, to.units))
    elif to.output is None:
        typer.echo(serialised(result, to.output_format, to.units), nl=False)
    if save_profile is not None and command is not None and isinstance(result, ModelReport):
        from optprof.results.profiles import write_profile

        write_profile(save_profile, result, command)
        console(stderr=True).print(f"wrote profile {save_profile}: `optprof check {save_profile}` guards it",
                                   soft_wrap=True)
    if result.interrupted is not None:
        import signal

        console(stderr=True).print(f"interrupted by {result.interrupted}: the rows that finished are kept, the others "
                                   "say `interrupted`", soft_wrap=True)
        raise typer.Exit(128 + signal.Signals[result.interrupted].value)
    if result.failed:
        raise typer.Exit(1)
