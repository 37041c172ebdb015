"""What a test can ask of the processes a run leaves: none but multiprocessing's own helpers."""

from __future__ import annotations

import os

import psutil

HELPERS = ("resource_tracker", "forkserver")  # multiprocessing's own: they exit with this process


def left_behind() -> list[psutil.Process]:
    """Our child processes, but for the helpers: the resource tracker, and the warm fork server the trials are
    forked from. A trial forked from the server is its child, so it still counts."""
    ours = psutil.Process(os.getpid())
    helpers = {p.pid for p in ours.children() if any(helper in " ".join(p.cmdline()) for helper in HELPERS)}
    return [p for p in ours.children(recursive=True) if p.pid not in helpers]
