"""The `optprof` command: the typer app assembled from one module per command, and the entry point that turns
user mistakes into one line and exit code 2.

Flags -> config dataclasses -> a command -> a report -> rendered. torch and transformers are imported inside
the commands so that `optprof --help` stays fast.
"""

from __future__ import annotations

import gc
import sys
import traceback
from typing import Annotated, Protocol, cast

import typer

from optprof import __version__
from optprof.cli import check, compare, listing, plan, predict, report, state_size, tune
from optprof.cli.inputs import SESSION
from optprof.cli.options import DebugOpt
from optprof.errors import UsageError
from optprof.interrupts import Interrupted, interruptible, stop_children
from optprof.quiet import quiet_libraries

app = typer.Typer(
    name="optprof",
    help="Memory and throughput profiler for LLM training optimizers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"optprof {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: DebugOpt = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    SESSION.debug = debug
    if not debug:
        quiet_libraries()


app.command("state-size")(state_size.state_size)
app.command("compare")(compare.compare)
app.command("predict")(predict.predict)
app.command("plan")(plan.plan)
app.command("tune")(tune.tune)
app.command("check")(check.check)
app.command("optimizers")(listing.optimizers)
app.command("models")(listing.models)
app.command("recipes")(listing.recipes)
app.command("gpus")(listing.gpus)
app.command("report")(report.report)


class _ClickError(Protocol):
    """What click's exceptions offer (typer may vendor click, so they are matched by class name)."""

    def show(self) -> None: ...

    def format_message(self) -> str: ...


def _click_kind(exc: BaseException) -> str | None:
    """'help', 'usage' or 'abort' for click's exceptions; typer may vendor click, so match by class name."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    if "NoArgsIsHelpError" in names:
        return "help"
    if "ClickException" in names and "UsageError" in names:
        return "usage"
    if "Abort" in names:
        return "abort"
    return None


# The garbage collector's youngest generation is collected every 700 new objects by default, and older ones
# with it; a fake step, a written trace or a replay makes millions (fake tensors, trace events), each older
# collection walking them and every module torch and transformers hold (four layer-periodic writes of a 32-layer
# trace: 1.77 s, 1.06 s with these). Every 100,000 here (uncollected in between: cyclic garbage of that many objects).
GC_THRESHOLDS = (100_000, 50, 100)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user mistakes become one line on stderr and exit code 2."""
    gc.set_threshold(*GC_THRESHOLDS)
    try:
        with interruptible():
            code = app(args=argv, prog_name="optprof", standalone_mode=False)
    except Interrupted as stop:  # before any row finished (or while the report was written): nothing to keep
        stop_children()
        typer.echo(f"optprof: interrupted by {stop}", err=True)
        sys.exit(stop.exit_code)
    except UsageError as exc:
        if SESSION.debug:
            traceback.print_exc()
        typer.echo(f"optprof: error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("optprof: interrupted", err=True)
        sys.exit(130)
    except Exception as exc:
        kind = _click_kind(exc)
        if kind == "help":  # bare `optprof`: the help, not an error
            cast(_ClickError, exc).show()
            sys.exit(0)
        if kind == "usage":  # a bad flag or value, from click's own parsing
            typer.echo(f"optprof: error: {cast(_ClickError, exc).format_message()}", err=True)
            sys.exit(2)
        if kind == "abort":
            typer.echo("optprof: aborted", err=True)
            sys.exit(1)
        if SESSION.debug:
            traceback.print_exc()
        else:
            typer.echo(f"optprof: internal error: {type(exc).__name__}: {exc} (run with --debug for details)",
                       err=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


def console_main() -> None:
    """The installed `optprof` command (and `python -m optprof`): `main`, then the process ends once its output is
    flushed, its exit handlers have run and its threads are done, without the interpreter tearing down what the
    command loaded (torch, transformers, a model and its traces: 0.8 s after predicting Llama-2-7B). Reports are
    written whole before this (`files.write_whole`), and every worker pool is joined where it is used."""
    import atexit
    import os
    import threading

    try:
        main()
        code: object = 0
    except SystemExit as exit_:
        code = exit_.code
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)  # as the interpreter prints a SystemExit's message
        code = 1
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)
