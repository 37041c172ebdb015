"""CUDA memory snapshots (`compare --memory-snapshot DIR`): the allocator's history over the tracked step,
dumped per optimizer and rank in the format PyTorch's memory visualiser opens."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path

MAX_ENTRIES = 100_000  # allocator events kept: enough for one step of a 7B model, a few hundred MB of history


def snapshot_path(directory: str | None, optimizer: str, rank: int = 0) -> Path | None:
    """DIR/<optimizer>[-rank<N>].pickle (a name safe for any file system), or None without --memory-snapshot."""
    if directory is None:
        return None
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", optimizer)
    return Path(directory) / (f"{safe}-rank{rank}.pickle" if rank else f"{safe}.pickle")


@contextlib.contextmanager
def cuda_memory_history(path: Path | None) -> Iterator[None]:
    """Record CUDA's allocator history around the block and dump it to `path` (nothing when `path` is None)."""
    if path is None:
        yield
        return
    import torch

    torch.cuda.memory._record_memory_history(max_entries=MAX_ENTRIES)
    try:
        yield
    finally:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.cuda.memory._dump_snapshot(str(path))
        torch.cuda.memory._record_memory_history(enabled=None)
