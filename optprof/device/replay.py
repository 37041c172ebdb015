"""An allocation trace replayed through the caching-allocator model: the peaks torch.cuda would report, the
cached free bytes at the reserved peak, and whether and where the step runs out of memory on a card of a given size."""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from optprof.device.alloc_conf import AllocatorConfig
from optprof.device.allocator import Block, CachingAllocator, OutOfMemory
from optprof.device.trace import DEFAULT_STREAM, AllocationTrace

REPEATS = 2  # steps replayed: the second starts from the first's cache, as every later step does


@dataclass
class Replay:
    peak_allocated: int  # torch.cuda.max_memory_allocated: allocated blocks, sizes rounded as the allocator does
    peak_reserved: int  # torch.cuda.max_memory_reserved: segments (or mapped pages)
    cached_free_at_reserved_peak: int  # reserved - allocated at the reserved peak
    retries: int  # cudaMalloc retries after releasing the cache (torch's num_alloc_retries)
    oom: str | None  # where the step ran out: the phase and what was being allocated; None: it fits
    allocator: CachingAllocator


def replay(trace: AllocationTrace, config: AllocatorConfig | None = None, capacity: int | None = None,
           record: bool = False, repeats: int = REPEATS, total_memory: int | None = None) -> Replay:
    """The trace's step `repeats` times (the allocations alive before the step, once) through one allocator on a
    card of `total_memory` bytes whose allocator may take `capacity`."""
    allocator = CachingAllocator(config, capacity, record, total_memory)
    streams = {name: index for index, name in enumerate([DEFAULT_STREAM, *trace.streams()])}
    start = trace.marks.get("step", 0)
    phases = sorted((index, phase) for phase, index in trace.marks.items())
    step_ids = {event.id for event in trace.events[start:] if event.alloc}
    live: dict[tuple[int, int], Block] = {}  # (repeat, allocation id): the setup's allocations are repeat 0's
    oom = None
    for repeat in range(repeats):
        for key in [k for k in live if repeat and k[0] == repeat - 1 and k[1] in step_ids]:
            allocator.free(live.pop(key))  # what a step left alive, the next step's own replaces
        for index in range(0 if repeat == 0 else start, len(trace.events)):
            event = trace.events[index]
            if not event.alloc:
                block = live.pop((repeat, event.id), None) or live.pop((0, event.id), None)
                if block is not None:
                    allocator.free(block)
            elif event.size:  # CUDACachingAllocator::allocate returns no memory for 0 bytes
                try:
                    live[(repeat, event.id)] = allocator.malloc(event.size, streams[event.stream],
                                                                trace.tags.get(event.id, ""))
                except OutOfMemory:
                    at = bisect.bisect_right([i for i, _ in phases], index) - 1
                    phase = phases[at][1] if at >= 0 else "setup"
                    oom = (f"step {repeat + 1}, {phase}: {trace.tags.get(event.id, 'a tensor')} of "
                           f"{event.size:,} bytes with {allocator.reserved:,} reserved")
                    break
        if oom is not None:
            break
    return Replay(allocator.peak_allocated, allocator.peak_reserved, allocator.cached_free_at_reserved_peak,
                  allocator.retries, oom, allocator)
