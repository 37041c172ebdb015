"""A model of PyTorch's CUDA caching allocator, in pure Python: replay a step's allocations and frees to learn
what the card would reserve, how much of it is free but cached, and whether (and where) the step runs out.

Every rule follows `c10/cuda/CUDACachingAllocator.cpp` (pytorch/pytorch, read at commit 001074d; the torch 2.13.0
installed here is git cf30153, whose allocator has the same constants and functions):
- sizes: `round_size` (512 B multiples, or `roundup_power2_next_division` with roundup_power2_divisions);
  `get_pool` (small pool up to kSmallSize = 1 MiB, else large); `get_allocation_size` (a 2 MiB segment for the
  small pool, 20 MiB under kMinLargeAlloc = 10 MiB, else the size rounded up to 2 MiB).
- reuse: `get_free_block` (best fit: the smallest cached block of the same stream and pool, ordered by
  `BlockComparatorSize` (stream, size, address); no oversize block for a request under max_split_size, and an
  oversize one only within kLargeBuffer of the request); `should_split` (small pool or expandable segments: a
  remainder of at least 512 B; large pool: the request under max_split_size and a remainder over 1 MiB);
  `alloc_found_block` (the block keeps the low addresses, the remainder goes back to the pool).
- growth: `alloc_block` (cudaMalloc of the allocation size, failing past the device's capacity, or
  `try_allocate_expandable_block` / `map_block` with expandable segments: one segment per stream and pool, grown
  in 2 MiB (small) or 20 MiB (large) pages, `ExpandableSegment::map`).
- frees: `free_block` + `try_merge_blocks` (merge with free neighbours of the same segment).
- out of memory: `malloc` tries `release_available_cached_blocks` (oversize blocks, only with max_split_size),
  then `release_cached_blocks` (every unsplit cached block; with expandable segments `unmap_block` releases every
  whole free page) and tries once more before raising.
- options (device/alloc_conf.py parses them as torch does): roundup_power2_divisions per size interval
  (`roundup_power2_divisions(size)`); large_segment_size_mb for the 1-10 MiB segments and the large pool's
  expandable pages; max_non_split_rounding_mb for how far an oversize block may exceed a request; a
  per_process_memory_fraction caps the segments at `round(fraction x total memory)` (`setMemoryFraction`,
  `alloc_block`); with it, garbage_collection_threshold runs `garbage_collect_cached_blocks` (whole cached large
  segments, oldest first by how many `get_free_block` calls they sat through) before `alloc_block` once the
  segments pass `threshold x` that cap.
- expandable segments reserve address space for 9/8 of the card's total memory (ExpandableSegment's constructor:
  `max_handles_ = numSegments(totalGlobalMem + totalGlobalMem / 8)`).
Not modelled: CUDA graphs' private pools, events from record_stream (FSDP2 keeps its buffers alive by reference
instead, which the trace's frees already reflect), backend:cudaMallocAsync (refused before any replay).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from optprof.device.alloc_conf import SIZE_MAX, AllocatorConfig

MIN_BLOCK = 512  # kMinBlockSize: every size is rounded to a multiple of it
SMALL_SIZE = 1 << 20  # kSmallSize: the largest request of the small pool
SMALL_BUFFER = 2 << 20  # kSmallBuffer: small requests are packed in 2 MiB segments (and expandable pages)
LARGE_BUFFER = 20 << 20  # kLargeBuffer: 1-10 MiB requests share 20 MiB segments (and expandable pages)
MIN_LARGE_ALLOC = 10 << 20  # kMinLargeAlloc
ROUND_LARGE = 2 << 20  # kRoundLarge: large segments are whole 2 MiB multiples
UNLIMITED = SIZE_MAX  # max_split_size's default: std::numeric_limits<size_t>::max()


class OutOfMemory(Exception):
    """The simulated allocator could not serve a request, even after releasing its cache."""

    def __init__(self, requested: int, allocated: int, reserved: int, capacity: int) -> None:
        super().__init__(f"out of memory: tried to allocate {requested} bytes with {allocated} allocated and "
                         f"{reserved} reserved of {capacity}")
        self.requested, self.allocated, self.reserved, self.capacity = requested, allocated, reserved, capacity


@dataclass(eq=False)
class Segment:
    """An expandable segment: address space for the whole device, backed by pages as they are mapped."""

    stream: int
    small: bool
    base: int
    size: int
    page: int  # 2 MiB for the small pool, 20 MiB for the large
    mapped_pages: set[int] = field(default_factory=set)


@dataclass(eq=False)
class Block:
    stream: int
    size: int
    addr: int
    small: bool
    allocated: bool = False
    requested: int = 0  # the size asked for, before rounding
    prev: Block | None = None
    next: Block | None = None
    segment: Segment | None = None  # expandable segments only
    mapped: bool = True
    tag: str = ""  # what the trace said the allocation was (for the snapshot's frames)
    gc_base: int = 0  # the pool's get_free_block calls when the block entered it (`gc_count_base`)

    @property
    def is_split(self) -> bool:
        return self.prev is not None or self.next is not None


class _Ordered:
    """Blocks ordered by a key (std::set with a comparator)."""

    def __init__(self, key: str) -> None:
        self.by_address = key == "address"
        self.keys: list[tuple[int, int, int]] = []
        self.blocks: list[Block] = []
        self.calls = 0  # get_free_block calls on this pool (`get_free_blocks_call_count`), garbage collection only

    def key(self, block: Block) -> tuple[int, int, int]:
        return (block.stream, block.addr, 0) if self.by_address else (block.stream, block.size, block.addr)

    def add(self, block: Block) -> None:
        block.gc_base = self.calls
        key = self.key(block)
        index = bisect.bisect_left(self.keys, key)
        self.keys.insert(index, key)
        self.blocks.insert(index, block)

    def remove(self, block: Block) -> None:
        index = bisect.bisect_left(self.keys, self.key(block))
        assert self.blocks[index] is block
        del self.keys[index], self.blocks[index]

    def lower_bound(self, key: tuple[int, int, int]) -> int:
        return bisect.bisect_left(self.keys, key)


class _Pool:
    def __init__(self, small: bool) -> None:
        self.small = small
        self.blocks = _Ordered("size")  # cached free, mapped blocks
        self.unmapped = _Ordered("address")  # expandable segments' address space not backed by pages


def round_size(size: int, divisions: int = 0) -> int:
    """`round_size`: at least 512 B, a multiple of 512 B, or the next power-of-2 division."""
    if size < MIN_BLOCK:
        return MIN_BLOCK
    if divisions > 1 and size > MIN_BLOCK * divisions:
        return _roundup_power2_next_division(size, divisions)
    return MIN_BLOCK * ((size + MIN_BLOCK - 1) // MIN_BLOCK)


def _roundup_power2_next_division(size: int, divisions: int) -> int:
    if size & (size - 1) == 0:
        return size
    floor = 1 << (size.bit_length() - 1)
    step = floor >> (divisions.bit_length() - 1)
    if step == 0:
        return floor << 1
    rounded = size & ~(step - 1)
    return size if rounded == size else rounded + step


def allocation_size(size: int, large_segment: int = LARGE_BUFFER) -> int:
    """`get_allocation_size`: the segment cudaMalloc'ed for a request that found no cached block."""
    if size <= SMALL_SIZE:
        return SMALL_BUFFER
    if size < MIN_LARGE_ALLOC:
        return large_segment
    return ROUND_LARGE * ((size + ROUND_LARGE - 1) // ROUND_LARGE)


@dataclass
class AllocatorEvent:
    """One entry of the allocator's trace, as torch.cuda.memory._snapshot()'s device_traces name them."""

    action: str  # alloc, free_completed, segment_alloc, segment_free, segment_map, segment_unmap, oom
    addr: int
    size: int
    stream: int
    tag: str = ""  # what the trace said the tensor was (parameter, activation, ...)


class CachingAllocator:
    """One device's allocator. `capacity`: the bytes cudaMalloc may take (the card less what sits outside the
    allocator); None: unlimited (peaks only). `total_memory`: the card's (totalGlobalMem), which sizes expandable
    segments' address space and the memory fraction's cap; None: the capacity."""

    def __init__(self, config: AllocatorConfig | None = None, capacity: int | None = None,
                 record: bool = False, total_memory: int | None = None) -> None:
        self.config = config or AllocatorConfig()
        self.capacity = capacity
        self.total_memory = total_memory if total_memory is not None else capacity
        fraction = self.config.per_process_memory_fraction
        # setMemoryFraction: allowed_memory_maximum, only for a fraction under 1 (std::round in 2.13)
        self.allowed = round(fraction * self.total_memory) if fraction < 1 and self.total_memory is not None \
            else None
        self.collects = self.allowed is not None and self.config.garbage_collection_threshold > 0
        self.small, self.large = _Pool(True), _Pool(False)
        self.allocated = self.reserved = 0  # bytes of allocated blocks; of segments (or mapped pages)
        self.peak_allocated = self.peak_reserved = 0
        self.allocated_at_peak_reserved = 0
        self.retries = self.ooms = 0
        self.cuda_segments: dict[int, tuple[int, int, bool]] = {}  # address -> (size, stream, small): cudaMalloc'ed
        self.expandable: list[Segment] = []
        self.active: set[Block] = set()  # allocated blocks
        self.events: list[AllocatorEvent] | None = [] if record else None
        self._next_address = 1 << 40  # virtual addresses handed out by the "driver"

    # ------------------------------------------------------------------------------------------------ public
    def malloc(self, orig_size: int, stream: int = 0, tag: str = "") -> Block:
        size = round_size(orig_size, self.config.divisions(orig_size))
        pool = self.small if size <= SMALL_SIZE else self.large
        block = self._get_free_block(pool, stream, size)
        if block is None and self.collects:
            self._garbage_collect_cached_blocks()
        if block is None:
            block = self._alloc_block(pool, stream, size)
        if block is None and self._release_available_cached_blocks(pool, stream, size):
            block = self._alloc_block(pool, stream, size)
        if block is None:  # free every unsplit cached block, then try once more
            self._release_cached_blocks()
            block = self._retry(pool, stream, size)
        if block is None:
            self.ooms += 1
            self._record("oom", 0, size, stream, tag)
            raise OutOfMemory(size, self.allocated, self.reserved, self.capacity or 0)
        return self._alloc_found_block(pool, block, size, orig_size, tag)

    def free(self, block: Block) -> None:
        block.allocated = False
        self.active.discard(block)
        self.allocated -= block.size
        self._record("free_completed", block.addr, block.requested, block.stream, block.tag)
        pool = self.small if block.small else self.large
        for neighbour in (block.prev, block.next):
            self._try_merge(block, neighbour, pool)
        pool.blocks.add(block)

    @property
    def cached_free_at_reserved_peak(self) -> int:
        """Reserved but not allocated at the reserved peak: cached blocks free at that moment."""
        return self.peak_reserved - self.allocated_at_peak_reserved

    # ------------------------------------------------------------------------------------------------ rules
    def _get_free_block(self, pool: _Pool, stream: int, size: int) -> Block | None:
        blocks = pool.blocks
        if self.collects:
            blocks.calls += 1
        index = blocks.lower_bound((stream, size, 0))
        if index == len(blocks.blocks) or blocks.blocks[index].stream != stream:
            return None
        if blocks.blocks[index].segment is not None:
            if not self.config.expandable_segments:
                index += 1
                while (index < len(blocks.blocks) and blocks.blocks[index].segment is not None
                       and blocks.blocks[index].stream == stream):
                    index += 1
                if index == len(blocks.blocks) or blocks.blocks[index].stream != stream:
                    return None
            else:
                # best fit counts an expandable block as large as it can grow (its unmapped tail)
                def expandable(b: Block) -> int:
                    return b.size + (b.next.size if b.next is not None and not b.next.mapped else 0)

                while (blocks.blocks[index].segment is not None and index + 1 < len(blocks.blocks)
                       and blocks.blocks[index + 1].stream == stream
                       and expandable(blocks.blocks[index + 1]) < expandable(blocks.blocks[index])):
                    index += 1
        candidate = blocks.blocks[index]
        limit = self.config.max_split_size
        if size < limit and candidate.size >= limit:
            return None  # no oversize block for a request that could be split from
        if size >= limit and candidate.size >= size + self.config.max_non_split_rounding:
            return None  # an oversize block only within max_non_split_rounding (20 MiB) of the request
        blocks.remove(candidate)
        return candidate

    def _should_split(self, block: Block, size: int) -> bool:
        remaining = block.size - size
        if block.small or self.config.expandable_segments:
            return remaining >= MIN_BLOCK
        return size < self.config.max_split_size and remaining > SMALL_SIZE

    def _alloc_found_block(self, pool: _Pool, block: Block, size: int, orig_size: int, tag: str) -> Block:
        if self._should_split(block, size):
            remaining = block
            block = Block(block.stream, size, block.addr, block.small, segment=remaining.segment)
            block.prev, block.next = remaining.prev, remaining
            if block.prev is not None:
                block.prev.next = block
            remaining.prev = block
            remaining.addr += size
            remaining.size -= size
            pool.blocks.add(remaining)
        block.allocated = True
        self.active.add(block)
        block.requested = orig_size
        block.tag = tag
        self.allocated += block.size
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        self._record("alloc", block.addr, orig_size, block.stream, tag)
        return block

    def _fits(self, size: int) -> bool:
        """cudaMalloc (or cuMemMap) of `size` more: within the card, and within the memory fraction's cap."""
        if self.allowed is not None and self.reserved + size > self.allowed:
            return False
        return self.capacity is None or self.reserved + size <= self.capacity

    def _grew(self, size: int) -> None:
        self.reserved += size
        if self.reserved > self.peak_reserved:
            self.peak_reserved = self.reserved
            self.allocated_at_peak_reserved = self.allocated

    def _alloc_block(self, pool: _Pool, stream: int, size: int) -> Block | None:
        if self.config.expandable_segments:
            return self._allocate_expandable(pool, stream, size)
        segment_size = allocation_size(size, self.config.large_segment_size)
        if not self._fits(segment_size):
            return None
        block = Block(stream, segment_size, self._address(segment_size), pool.small)
        self._grew(segment_size)
        self.cuda_segments[block.addr] = (segment_size, stream, pool.small)
        self._record("segment_alloc", block.addr, segment_size, stream, "")
        return block

    def _retry(self, pool: _Pool, stream: int, size: int) -> Block | None:
        self.retries += 1
        return self._alloc_block(pool, stream, size)

    def _release_available_cached_blocks(self, pool: _Pool, stream: int, size: int) -> bool:
        """Free oversize cached segments, from the largest under the request down, until `size` is covered
        (max_split_size only); expandable blocks are stepped over, as 2.13 does (they are never cudaFree'd)."""
        limit = self.config.max_split_size
        if limit == UNLIMITED:
            return False
        key_size = max(size, limit)
        blocks = pool.blocks
        index = blocks.lower_bound((stream, key_size, 0))
        if (index < len(blocks.blocks) and blocks.blocks[index].stream == stream
                and blocks.blocks[index].segment is None):
            self._release_block(blocks.blocks[index], pool)
            return True
        released = 0
        index -= 1
        candidates = []
        while (index >= 0 and released < key_size and blocks.blocks[index].size >= limit
               and blocks.blocks[index].stream == stream):
            block = blocks.blocks[index]
            if block.segment is None:
                released += block.size
                candidates.append(block)
            index -= 1
        for block in candidates:
            self._release_block(block, pool)
        return released >= key_size

    def _garbage_collect_cached_blocks(self) -> None:
        """`garbage_collect_cached_blocks`: past `threshold x allowed`, free whole cached large segments whose
        age (get_free_block calls since they were cached) is at least the mean, until the excess is gone."""
        assert self.allowed is not None
        threshold = int(self.config.garbage_collection_threshold * self.allowed)
        if self.reserved <= threshold:
            return
        target, reclaimed = self.reserved - threshold, 0
        blocks = self.large.blocks

        def age(block: Block) -> int:
            return blocks.calls - block.gc_base

        whole = [b for b in blocks.blocks if not b.is_split]  # expandable ones count towards the mean
        total_age, count = sum(age(b) for b in whole), len(whole)
        freed = True
        while reclaimed < target and freed and count > 0:
            mean, freed = total_age / count, False
            for block in list(blocks.blocks):
                if not block.is_split and block.segment is None and age(block) >= mean:
                    freed = True
                    reclaimed += block.size
                    total_age -= age(block)
                    count -= 1
                    self._release_block(block, self.large)

    def _release_cached_blocks(self) -> None:
        for pool in (self.large, self.small):
            to_unmap = []
            for block in list(pool.blocks.blocks):
                if block.segment is not None:
                    to_unmap.append(block)
                elif not block.is_split:
                    self._release_block(block, pool)
            for block in to_unmap:
                self._unmap_block(block, pool)

    def _release_block(self, block: Block, pool: _Pool) -> None:
        pool.blocks.remove(block)
        self.reserved -= block.size
        del self.cuda_segments[block.addr]
        self._record("segment_free", block.addr, block.size, block.stream, "")

    def _try_merge(self, dst: Block, src: Block | None, pool: _Pool) -> int:
        if src is None or src.allocated or dst.mapped != src.mapped:
            return 0
        if dst.prev is src:
            dst.addr = src.addr
            dst.prev = src.prev
            if dst.prev is not None:
                dst.prev.next = dst
        else:
            dst.next = src.next
            if dst.next is not None:
                dst.next.prev = dst
        dst.size += src.size
        (pool.blocks if src.mapped else pool.unmapped).remove(src)
        return src.size

    def _address(self, size: int) -> int:
        address = self._next_address
        self._next_address += size + ROUND_LARGE  # a gap, so segments never touch
        return address

    # ------------------------------------------------------------------------------------- expandable segments
    def _find_expandable_block(self, pool: _Pool, stream: int, size: int) -> Block:
        def allocatable(b: Block | None) -> bool:
            return b is not None and not b.allocated

        def room(b: Block | None) -> bool:
            total = 0
            while total < size and allocatable(b):
                assert b is not None
                total += b.size
                b = b.next
            return total >= size

        index = pool.unmapped.lower_bound((stream, 0, 0))
        while index < len(pool.unmapped.blocks) and pool.unmapped.blocks[index].stream == stream:
            candidate = pool.unmapped.blocks[index]
            if allocatable(candidate.prev):
                assert candidate.prev is not None
                candidate = candidate.prev
            if room(candidate):
                return candidate
            index += 1
        page = SMALL_BUFFER if pool.small else self.config.large_segment_size
        total = self.total_memory or (1 << 40)
        space = page * ((total + total // 8 + page - 1) // page)  # numSegments(total + total / 8) pages
        segment = Segment(stream, pool.small, self._address(space), space, page)
        self.expandable.append(segment)
        head = Block(stream, space, segment.base, pool.small, segment=segment, mapped=False)
        pool.unmapped.add(head)
        return head

    def _map_block(self, block: Block, size: int, pool: _Pool) -> bool:
        segment = block.segment
        assert segment is not None and not block.mapped
        first = (block.addr - segment.base) // segment.page
        last = (block.addr + size - segment.base + segment.page - 1) // segment.page
        mapped = (last - first) * segment.page
        if not self._fits(mapped):
            return False
        segment.mapped_pages.update(range(first, last))
        pool.unmapped.remove(block)
        block.mapped = True
        if mapped < block.size:
            rest = Block(block.stream, block.size - mapped, block.addr + mapped, block.small, segment=segment,
                         mapped=False)
            rest.prev, rest.next = block, block.next
            if block.next is not None:
                block.next.prev = rest
            block.next = rest
            pool.unmapped.add(rest)
            block.size = mapped
        self._try_merge(block, block.prev, pool)
        self._try_merge(block, block.next, pool)
        pool.blocks.add(block)
        self._grew(mapped)
        self._record("segment_map", block.addr, mapped, block.stream, "")
        return True

    def _allocate_expandable(self, pool: _Pool, stream: int, size: int) -> Block | None:
        candidate = self._find_expandable_block(pool, stream, size)
        if not candidate.mapped and not self._map_block(candidate, min(candidate.size, size), pool):
            return None
        while candidate.size < size:
            following = candidate.next
            assert following is not None
            if not self._map_block(following, min(size - candidate.size, following.size), pool):
                return None
            candidate = following  # map_block merged the earlier free part into it
        pool.blocks.remove(candidate)
        return candidate

    def _unmap_block(self, block: Block, pool: _Pool) -> None:
        segment = block.segment
        assert segment is not None
        first = (block.addr - segment.base + segment.page - 1) // segment.page  # whole pages inside only
        last = (block.addr + block.size - segment.base) // segment.page
        if last <= first:
            return
        start, end = segment.base + first * segment.page, segment.base + last * segment.page
        pool.blocks.remove(block)
        if start > block.addr:
            before = Block(block.stream, start - block.addr, block.addr, block.small, segment=segment)
            before.prev, before.next = block.prev, block
            if block.prev is not None:
                block.prev.next = before
            block.prev = before
            pool.blocks.add(before)
        if block.addr + block.size > end:
            after = Block(block.stream, block.addr + block.size - end, end, block.small, segment=segment)
            after.prev, after.next = block, block.next
            if block.next is not None:
                block.next.prev = after
            block.next = after
            pool.blocks.add(after)
        block.addr, block.size, block.mapped = start, end - start, False
        segment.mapped_pages.difference_update(range(first, last))
        self._try_merge(block, block.prev, pool)
        self._try_merge(block, block.next, pool)
        pool.unmapped.add(block)
        self.reserved -= end - start
        self._record("segment_unmap", start, end - start, block.stream, "")

    def _record(self, action: str, addr: int, size: int, stream: int, tag: str) -> None:
        if self.events is not None:
            self.events.append(AllocatorEvent(action, addr, size, stream, tag))

    # ------------------------------------------------------------------------------------------------ views
    def segment_blocks(self) -> list[list[Block]]:
        """Each segment's blocks in address order: a cudaMalloc'ed segment whole, an expandable segment as one
        list per run of mapped pages (as torch's snapshot reports them)."""
        everything = [*self.active, *self.small.blocks.blocks, *self.large.blocks.blocks]
        everything.sort(key=lambda b: b.addr)
        runs: list[list[Block]] = []
        for block in everything:
            last = runs[-1][-1] if runs else None
            if last is not None and last.next is block:
                runs[-1].append(block)
            else:
                runs.append([block])
        return runs
