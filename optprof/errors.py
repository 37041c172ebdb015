"""The one exception type that means "the user asked for something we cannot do"."""


class UsageError(Exception):
    """Bad input from the user: the CLI prints the message on one line and exits with code 2."""


def error_text(exc: BaseException) -> str:
    """'TypeName: first line of the message', for a failed row's reason."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
