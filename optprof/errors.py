"""The exception types that mean something other than a bug: bad input (UsageError), and an optimizer that
cannot run in the setup asked for (SetupUnsupported)."""

from __future__ import annotations

from pathlib import Path


class UsageError(Exception):
    """Bad input from the user: the CLI prints the message on one line and exits with code 2."""


def read_user_file(path: Path, what: str = "") -> bytes:
    """The bytes of a file the user named; one that cannot be read is their one-line error, e.g.
    "cannot read --space 'x.toml': No such file or directory"."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {what}'{path}': {exc.strerror or exc}") from exc


def read_user_text(path: Path, what: str = "") -> str:
    """`read_user_file` as UTF-8 text; bytes that are not UTF-8 are the user's one-line error too."""
    data = read_user_file(path, what)
    try:
        return data.decode()
    except UnicodeDecodeError as exc:
        raise UsageError(f"cannot read {what}'{path}': not UTF-8 text (byte {exc.start})") from exc


def error_text(exc: BaseException) -> str:
    """'TypeName: first line of the message', for a failed row's reason."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


class SetupUnsupported(RuntimeError):
    """The optimizer cannot run in this setup (grad accumulation, ranks, ...): a finding, reported as
    `unsupported` with this message."""
