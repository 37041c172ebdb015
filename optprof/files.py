"""Files optprof writes: checked before any work (a typo in a path costs a second, not the run), and written
whole (a temporary file in the same folder, then `os.replace`), so that a kill mid-write leaves the old file or
the new one, never a truncated profile that the next `check` would read as a baseline."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

from optprof.errors import UsageError


def check_writable(path: Path, flag: str) -> None:
    """`path` can be written: its folder exists and takes new files, and the name is not a folder. One line and
    exit 2 otherwise, before the command does anything else."""
    folder = path.parent
    if path.is_dir():
        raise UsageError(f"{flag} {path}: that is a folder; give a file name")
    if not folder.is_dir():
        raise UsageError(f"{flag} {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: cannot write in {folder} (permission denied)")


def check_folder(path: Path, flag: str) -> None:
    """`path` is a folder optprof can create files in, or can be created (its parent exists and is writable)."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path}: that is a file; give a folder")
    existing = path if path.is_dir() else path.parent
    if not existing.is_dir():
        raise UsageError(f"{flag} {path}: the folder {existing} does not exist")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: cannot write in {existing} (permission denied)")


def write_whole(path: Path, data: bytes) -> None:
    """Write `data` to `path` all at once for any reader: a temporary sibling, flushed to disk, then renamed over
    `path`. The new file gets the mode a plain write would give it (or the old file's)."""
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~_umask())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_cache(path: Path) -> dict[str, Any]:
    """A JSON cache file of optprof's: {} when there is none yet; {} and one warning when it is damaged (it is
    then rebuilt by whoever writes it next)."""
    try:
        text = path.read_text()
    except OSError:
        return {}
    try:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("not an object")
    except ValueError:
        warnings.warn(f"ignoring the damaged cache file {path}: it is rebuilt", stacklevel=2)
        return {}
    return data
