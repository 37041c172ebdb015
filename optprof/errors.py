"""The exception types that mean something other than a bug: bad input (UsageError), and an optimizer that
cannot run in the setup asked for (SetupUnsupported)."""


class UsageError(Exception):
    """Bad input from the user: the CLI prints the message on one line and exits with code 2."""


def error_text(exc: BaseException) -> str:
    """'TypeName: first line of the message', for a failed row's reason."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


class SetupUnsupported(RuntimeError):
    """The optimizer cannot run in this setup (grad accumulation, ranks, ...): a finding, reported as
    `unsupported` with this message."""
