"""The simulated allocator as `torch.cuda.memory._snapshot()` gives a real one: its segments and blocks, and the
trace of allocations, frees and segment (un)mappings, so PyTorch's memory visualiser (pytorch.org/memory_viz, or
`torch.cuda._memory_viz`) opens the *predicted* step before there is a GPU. Each event's one frame names what the
allocation was (parameter, activation, ...), as the trace recorded it."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from optprof.device.allocator import CachingAllocator
from optprof.files import write_whole

FRAME_FILE = "optprof predict (simulated)"


def _frames(tag: str) -> list[dict[str, Any]]:
    return [{"filename": FRAME_FILE, "line": 0, "name": tag or "tensor"}]


def snapshot(allocator: CachingAllocator) -> dict[str, Any]:
    """The allocator's state now, and its recorded events (a CachingAllocator made with record=True)."""
    segments = []
    for run in allocator.segment_blocks():
        head = run[0]
        blocks: list[dict[str, Any]] = [
            {"address": b.addr, "size": b.size, "requested_size": b.requested if b.allocated else 0,
             "state": "active_allocated" if b.allocated else "inactive", "frames": []} for b in run]
        allocated = sum(b.size for b in run if b.allocated)
        segments.append({
            "device": 0, "address": head.addr, "total_size": sum(b.size for b in run), "stream": head.stream,
            "segment_type": "small" if head.small else "large", "segment_pool_id": (0, 0),
            "is_expandable": head.segment is not None, "frames": [], "allocated_size": allocated,
            "active_size": allocated, "requested_size": sum(b.requested for b in run if b.allocated),
            "blocks": blocks,
        })
    trace: list[dict[str, Any]] = []
    for event in allocator.events or ():
        entry = {"addr": event.addr, "size": event.size, "stream": event.stream, "frames": _frames(event.tag),
                 "time_us": len(trace)}
        if event.action == "free_completed":  # torch records the request, then its completion
            trace.append({**entry, "action": "free_requested"})
            entry = {**entry, "time_us": len(trace)}
        trace.append({**entry, "action": event.action})
    return {"segments": sorted(segments, key=lambda s: s["address"]), "device_traces": [trace],
            "allocator_settings": {"PYTORCH_CUDA_ALLOC_CONF": allocator.config.text()}}


def write_snapshot(allocator: CachingAllocator, path: str) -> None:
    """A pickle as torch.cuda.memory._dump_snapshot writes one; with an .html suffix, memory_viz's timeline page."""
    data = snapshot(allocator)
    target = Path(path)
    if target.suffix == ".html":
        from torch.cuda import _memory_viz

        write_whole(target, _memory_viz.trace_plot(data).encode())
    else:
        write_whole(target, pickle.dumps(data))
