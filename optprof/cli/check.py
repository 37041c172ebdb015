"""`optprof check`: the CI regression check over profiles."""

from __future__ import annotations

from optprof.cli.options import FormatOpt, JunitOpt, OutputFormat, ProfilePathsArg, StrictOpt, UpdateOpt
from optprof.cli.output import destination, finish, write
from optprof.errors import UsageError
from optprof.files import check_writable


def check(paths: ProfilePathsArg = None, update: UpdateOpt = False, strict: StrictOpt = False, junit: JunitOpt = None,
          output_format: FormatOpt = OutputFormat.TABLE) -> None:
    """CI regression check: recompute each profile's measures and compare them with the expected values.

    Optimizer-state bytes and predicted peaks run on any machine; measured peak and tokens/s need a GPU and
    are skipped (and said so) without one. Exit code 0 when every measure holds, 1 on a regression, 2 on a
    usage error or an unreadable profile.
    """
    from optprof.commands.check import run_check, to_junit
    from optprof.model.loading import profiles_dir
    from optprof.render.console import console

    if output_format not in (OutputFormat.TABLE, OutputFormat.JSON):
        raise UsageError("check writes table or json (and --junit XML)")
    if junit is not None:
        check_writable(junit, "--junit")
    with console(stderr=True).status("checking profiles ...") as status:
        result = run_check(paths or [profiles_dir()], update=update, strict=strict,
                           on_profile=lambda p: status.update(f"checked {p.path} ({p.model})"))
    if junit is not None:
        write(junit, to_junit(result), "JUnit XML")
    finish(result, destination(output_format, None))
