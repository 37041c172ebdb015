"""The allocation trace of a step on fake tensors: every storage the step allocates or frees, in order, with its
size, the stream it was allocated on, and what it was.

`TraceRecorder` is a dispatch mode: each op's outputs whose storage it has not seen are allocations; a storage
dying (a weak reference's callback) is a free; `UntypedStorage.resize_` (FSDP2 frees and re-allocates its
all-gather buffers that way) is a free and an allocation. The stream is the one FSDP2 entered with
`device_handle.stream(...)` (`_fsdp_collectives.foreach_all_gather`: the all-gather buffer on the copy-in
stream; `foreach_reduce`: the reduce-scatter output on the reduce-scatter stream), read from FSDP2's
`FSDPCommContext`; everything else is on the default stream. What each allocation was:
- parameter, buffer, gradient, state: storages alive when recording starts, and gradients and state when their
  phase ends;
- communication: FSDP2's collective buffers (`AllocMixin.allocate`) and what its streams allocate;
- activation: allocated during a forward and still alive at its end; temporary: the rest;
- workspace: cuBLAS's workspace, which cuBLAS allocates through the caching allocator at the first matmul of each
  (thread, stream): one for forward, one for the autograd engine's backward thread (aten/src/ATen/cuda/
  CublasHandlePool.cpp: setCublasWorkspace, getChosenWorkspaceSize: 32 MiB on sm90);
- attention workspace (CUDA targets): what the flash-attention backward allocates besides its outputs and frees
  when it returns, which CPU's kernel keeps to itself: dq_accum, float32 (batch, seq_q rounded to 128, heads,
  head dim rounded to 32, or 64 over 128), and softmax_d, float32 (batch, heads, seq_q rounded to 128)
  (aten/src/ATen/native/transformers/cuda/flash_attn/flash_api.cpp: mha_bwd).
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from optprof.device.ops import (
    COLLECTIVES,
    DTYPE_NAMES,
    MATMUL_OPS,
    OpKind,
    OpRecord,
    collective_bytes,
    collective_ranks,
    flops_of,
    matmul_dims,
    mutated_arguments,
    op_info,
    tensor_bytes,
    with_ids,
)

DEFAULT_STREAM = "default"
FLASH_BACKWARD = ("_scaled_dot_product_flash_attention_for_cpu_backward",
                  "_scaled_dot_product_flash_attention_backward", "_flash_attention_backward")
MATMULS = (*MATMUL_OPS, "linear")  # ops that take a cuBLAS handle


@dataclass(frozen=True)
class TraceEvent:
    alloc: bool  # False: a free
    id: int  # the allocation's number; a free names the allocation it ends
    size: int  # bytes asked for
    stream: str


@dataclass
class AllocationTrace:
    events: list[TraceEvent] = field(default_factory=list)
    tags: dict[int, str] = field(default_factory=dict)  # allocation id -> what it was
    marks: dict[str, int] = field(default_factory=dict)  # phase -> index of the first event after it began
    ops: list[OpRecord] = field(default_factory=list)  # the kernels and collectives, in issue order (device/ops.py)

    def streams(self) -> list[str]:
        return list(dict.fromkeys(e.stream for e in self.events))


def extrapolated(one: AllocationTrace, two: AllocationTrace, at: int, micro_batch: int) -> AllocationTrace | None:
    """The trace at `micro_batch` from the traces at micro-batch `at` and `at + 1`: the same allocations and frees
    in the same order, each size on the line through its two sizes (activations grow with the batch; parameters,
    state and the like do not). None where the two differ in anything but sizes (a path taken at one size only:
    micro-batch 1 often allocates one tensor fewer) or a size would fall below zero: then no line holds."""
    if len(one.events) != len(two.events) or one.marks != two.marks or one.tags != two.tags:
        return None
    events = []
    for a, b in zip(one.events, two.events, strict=True):
        if (a.alloc, a.id, a.stream) != (b.alloc, b.id, b.stream):
            return None
        size = a.size + (micro_batch - at) * (b.size - a.size)
        if size < 0:
            return None
        events.append(TraceEvent(a.alloc, a.id, size, a.stream))
    return AllocationTrace(events, dict(one.tags), dict(one.marks))  # no ops: time is predicted from traced steps


def extrapolated_ops(one: AllocationTrace, two: AllocationTrace, at: int, micro_batch: int) -> list[OpRecord] | None:
    """The ops at `micro_batch` from the traces at `at` and `at + 1`: the same ops reading and writing the same
    allocations, each op's FLOPs, bytes and matmul dimensions on the line through its two values (a token-wise op
    grows with the batch; the optimizer's do not). None where the ops differ in anything else."""
    if len(one.ops) != len(two.ops):
        return None
    ops = []
    for a, b in zip(one.ops, two.ops, strict=True):
        if (a.name, a.kind, a.stream, a.phase, a.dtype, a.reads, a.writes, a.group, a.mnk is None) != \
                (b.name, b.kind, b.stream, b.phase, b.dtype, b.reads, b.writes, b.group, b.mnk is None):
            return None
        step = micro_batch - at
        mnk = None if a.mnk is None or b.mnk is None else \
            (a.mnk[0] + step * (b.mnk[0] - a.mnk[0]), a.mnk[1] + step * (b.mnk[1] - a.mnk[1]),
             a.mnk[2] + step * (b.mnk[2] - a.mnk[2]), a.mnk[3] + step * (b.mnk[3] - a.mnk[3]))
        ops.append(dataclasses.replace(a, flops=a.flops + step * (b.flops - a.flops),
                                       bytes=a.bytes + step * (b.bytes - a.bytes), mnk=mnk, key=None, spec=None))
    return ops


def frees_in_order(events: list[TraceEvent], marks: dict[str, int]) -> list[TraceEvent]:
    """Each run of consecutive frees (not crossing a mark) sorted by allocation."""
    ordered: list[TraceEvent] = []
    cuts = set(marks.values())
    run: list[TraceEvent] = []
    for index, event in enumerate(events):
        if run and (event.alloc or index in cuts):
            ordered += sorted(run, key=lambda e: e.id)
            run = []
        if event.alloc:
            ordered.append(event)
        else:
            run.append(event)
    return ordered + sorted(run, key=lambda e: e.id)


def _renumbered(op: OpRecord, number: dict[int, int]) -> OpRecord:
    """An op's storages under the finished trace's numbering (a storage allocated before recording keeps -1 - id)."""

    def ids(found: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(number.get(i, -1 - i) for i in found)

    return with_ids(op, ids(op.reads), ids(op.writes))


def finished(trace: AllocationTrace, joined: tuple[int, int] | None, state_place: int | None) -> AllocationTrace:
    """A recording's trace, canonical: the frees of one moment (no allocation between them) in allocation order,
    since storages dying together (a graph released, a collection) go in an order Python does not fix, and freeing
    them in any order leaves the allocator the same; and with a state that joined late (`joined`: its events), the
    state's allocations at their place (`state_place`), every allocation numbered in order (as the recorder numbers
    them), the marks after it moved on: the trace of a recording that had the state from the start."""
    events = list(trace.events)
    marks = dict(trace.marks)
    if joined is not None and state_place is not None:
        first, end = joined
        place = state_place
        events = events[:place] + events[first:end] + events[place:first] + events[end:]
        marks = {phase: index + end - first if index >= place else index for phase, index in marks.items()}
    number: dict[int, int] = {}
    for event in events:
        if event.alloc:
            number[event.id] = len(number)
    renumbered = [TraceEvent(e.alloc, number[e.id], e.size, e.stream) for e in events]
    tags = {number[allocation]: tag for allocation, tag in trace.tags.items() if allocation in number}
    ops = [_renumbered(op, number) for op in trace.ops]
    return AllocationTrace(frees_in_order(renumbered, marks), tags, marks, ops)


@dataclass(frozen=True)
class RecordingPoint:
    """A place in a recording (`TraceRecorder.point`): its events, ops and allocations so far, what it keeps past
    backward (`name_kept`), and its tags then."""

    events: int
    ops: int
    next_id: int
    kept: tuple[tuple[int, int], ...]  # (allocation, bytes) of what the step keeps past backward (`name_kept`)
    tags: dict[int, str]


@dataclass(frozen=True)
class OptimizerPart:
    """One optimizer's state joining and step, as recorded after another recording's backward (`part_since`), in
    that recording's numbering: allocations from `first_id` on are the part's own; below `inputs_end`, what was
    alive before the step (alike in every recording of one model); `kept`, what that recording kept past backward."""

    events: list[TraceEvent]
    ops: list[OpRecord]
    tags: dict[int, str]  # the part's own allocations'
    first_id: int
    kept: tuple[tuple[int, int], ...]  # (allocation, bytes) of what the step keeps past backward (`name_kept`)
    inputs_end: int
    joined: tuple[int, int] | None  # the state's events within `events`
    retagged: bool  # whether it named anything of the recording's anew (then no other recording can take it)


class TraceRecorder:
    """Records the allocation trace of whatever runs inside `with recorder.recording():` (on fake tensors), and with
    `ops`, every op with its cost inputs (device/ops.py); with `specs`, also what rebuilds each op for timing it."""

    def __init__(self, workspace_bytes: int = 0, ops: bool = False, specs: bool = False) -> None:
        self.trace = AllocationTrace()
        self.workspace_bytes = workspace_bytes  # cuBLAS workspace per (thread, stream); 0: none (a CPU target)
        self.records_ops = ops
        self.keeps_specs = specs
        self._phase = "step"
        from torch.utils.weak import WeakIdKeyDictionary

        # storage -> [its current allocation id, or None after a resize to 0]; one finalizer per storage frees it
        self._ids: Any = WeakIdKeyDictionary()
        self._next = 0
        self._stream = DEFAULT_STREAM
        self._stream_names: dict[int, str] = {}
        self._communication = 0  # > 0 inside an FSDP2 collective buffer's allocation
        self._phase_allocations: list[int] = []  # ids allocated in the current forward
        self._workspaces: set[tuple[bool, str]] = set()  # (backward?, stream) with a workspace
        self._matmul: dict[Any, bool] = {}  # op -> takes a cuBLAS handle (asked once per op)
        self._in_backward = False
        self._state_place: int | None = None  # where the state's allocations go (event index), if it joins later
        self._joined: tuple[int, int] | None = None  # the events join_state added: [first, end)
        self._ended = False  # recording is over: storages dying later (the step's inputs) are not in the trace
        self.kept: tuple[tuple[int, int], ...] = ()  # (allocation, bytes) kept past backward (`name_kept`)

    # ------------------------------------------------------------------------------------------------ marks
    def mark(self, phase: str) -> None:
        self.trace.marks.setdefault(phase, len(self.trace.events))
        self._phase = phase  # every forward of a gradient accumulation marks again

    def start_forward(self) -> None:
        self._phase_allocations = []
        self._in_backward = False

    def end_forward(self) -> None:
        """Allocations of this forward still alive now are its activations."""
        live = {holder[0] for holder in self._ids.values() if holder[0] is not None}
        for allocation in self._phase_allocations:
            if allocation in live and self.trace.tags.get(allocation) in (None, "temporary"):
                self.trace.tags[allocation] = "activation"
        self._phase_allocations = []
        self._in_backward = True

    def keep_state_place(self) -> None:
        """The optimizer's state would be allocated here (after parameters and buffers, before the inputs)."""
        self._state_place = len(self.trace.events)

    def join_state(self, tensors: Any) -> None:
        """The optimizer's state, joining a recording that ran without it (one forward and backward for every
        optimizer): allocated now, moved to its place by `finished_trace`."""
        first = len(self.trace.events)
        self.tag_tensors(tensors, "state")
        self._joined = (first, len(self.trace.events))

    def finished_trace(self) -> AllocationTrace:
        """The trace, canonical (`finished`): a state that joined late (`join_state`) at its place."""
        return finished(self.trace, self._joined, self._state_place)

    def point(self) -> RecordingPoint:
        """Where the recording is now (after backward: where each optimizer's step would begin)."""
        return RecordingPoint(len(self.trace.events), len(self.trace.ops), self._next, self.kept,
                              dict(self.trace.tags))

    def part_since(self, point: RecordingPoint) -> OptimizerPart:
        """What the recording added since `point` (in a forked child: its optimizer's state joining and its step),
        for `with_part` to add to another recording of the same model."""
        retagged = any(point.tags.get(allocation) != tag for allocation, tag in self.trace.tags.items()
                       if allocation < point.next_id)
        joined = None if self._joined is None else (self._joined[0] - point.events, self._joined[1] - point.events)
        return OptimizerPart(self.trace.events[point.events:], self.trace.ops[point.ops:],
                             {allocation: tag for allocation, tag in self.trace.tags.items()
                              if allocation >= point.next_id},
                             point.next_id, point.kept, self._inputs_end(), joined, retagged)

    def with_part(self, part: OptimizerPart, point: RecordingPoint) -> AllocationTrace | None:
        """The finished trace of this recording up to `point` (the end of its backward) and then `part`, another
        recording's optimizer step on the same model, as if this recording had gone on through it: the part's own
        allocations numbered on from here; its references to what that recording kept past backward sent to what
        this one kept (each parameter's gradient, the loss: `name_kept`); to what was alive before the step
        (parameters, buffers, inputs), kept. None where the part touches anything else of that recording's (its
        forward's or backward's), retagged any of it, or the two differ before the step: then it is not the same
        step, and the caller runs it."""
        if part.retagged or part.inputs_end != self._inputs_end():
            return None
        if [size for _, size in part.kept] != [size for _, size in point.kept]:
            return None  # a parameter with a gradient in one and not the other, or of another size
        kept: dict[int, int] = {}  # that recording's allocation -> this one's
        for (theirs, _), (ours, _) in zip(part.kept, point.kept, strict=True):
            if kept.setdefault(theirs, ours) != ours:
                return None  # gradients that share a storage (FSDP2's reduce-scatter output) in one, not the other
        if len(set(kept.values())) != len(kept):
            return None
        shift = point.next_id - part.first_id

        def mapped(allocation: int) -> int | None:
            if allocation >= part.first_id:
                return allocation + shift
            if allocation < part.inputs_end:
                return allocation
            return kept.get(allocation)

        added = []
        for event in part.events:
            allocation = mapped(event.id)
            if allocation is None:
                return None
            added.append(TraceEvent(event.alloc, allocation, event.size, event.stream))
        ops = []
        for op in part.ops:
            reads, writes = tuple(map(mapped, op.reads)), tuple(map(mapped, op.writes))
            if None in reads or None in writes:
                return None
            ops.append(with_ids(op, reads, writes))  # type: ignore[arg-type]
        tags = {allocation: tag for allocation, tag in self.trace.tags.items() if allocation < point.next_id}
        tags.update((allocation + shift, tag) for allocation, tag in part.tags.items())
        marks = {phase: index for phase, index in self.trace.marks.items() if index <= point.events}
        joined = None if part.joined is None else (part.joined[0] + point.events, part.joined[1] + point.events)
        trace = AllocationTrace(self.trace.events[:point.events] + added, tags, marks,
                                [*self.trace.ops[:point.ops], *ops])
        return finished(trace, joined, self._state_place)

    def _inputs_end(self) -> int:
        """The allocations numbered before the step began: parameters, buffers, inputs (and state, if it had it)."""
        begun = self.trace.marks.get("step", len(self.trace.events))
        return sum(1 for event in self.trace.events[:begun] if event.alloc)

    def name_kept(self, gradients: list[Any], loss: Any) -> None:
        """What a step keeps past its backward, in order, for `with_part`: each parameter's gradient (tagged; None:
        none), then the loss."""
        found = []
        for position, tensor in enumerate([*gradients, loss]):
            if tensor is None:
                found.append((-1, 0))
                continue
            storage = (tensor.to_local() if hasattr(tensor, "to_local") else tensor).untyped_storage()
            allocation = self._see(storage)
            if position < len(gradients):
                self.trace.tags[allocation] = "gradient"
            found.append((allocation, storage.nbytes()))
        self.kept = tuple(found)

    def tag_tensors(self, tensors: Any, tag: str) -> None:
        """Name what these tensors' storages are (allocating those not seen yet: they were alive already)."""
        for tensor in tensors:
            if tensor is None:
                continue
            local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
            allocation = self._see(local.untyped_storage())
            self.trace.tags[allocation] = tag

    def name_streams(self, model: Any) -> None:
        """FSDP2's streams by name, from the root's communication context (after its lazy init)."""
        state = model._get_fsdp_state() if hasattr(model, "_get_fsdp_state") else None
        context = getattr(state, "_comm_ctx", None)
        for attribute in ("all_gather_copy_in_stream", "all_gather_stream", "reduce_scatter_stream",
                          "all_reduce_stream"):
            stream = getattr(context, attribute, None)
            if stream is not None:
                self._stream_names[id(stream)] = attribute.removesuffix("_stream").replace("_", "-")

    # ------------------------------------------------------------------------------------------------ events
    def _holder(self, storage: Any) -> list[int | None]:
        holder = self._ids.get(storage)
        if holder is None:
            holder = [None]
            self._ids[storage] = holder
            weakref.finalize(storage, self._free_current, holder)
        return holder

    def _see(self, storage: Any) -> int:
        holder = self._holder(storage)
        allocation = holder[0]
        if allocation is None:
            allocation = holder[0] = self._allocate(storage.nbytes())
        return allocation

    def _free_current(self, holder: list[int | None]) -> None:
        if holder[0] is not None and not self._ended:  # a storage dropped after the step is not the step's
            self._free(holder[0])
            holder[0] = None

    def _allocate(self, size: int, tag: str | None = None) -> int:
        allocation = self._next
        self._next += 1
        self.trace.events.append(TraceEvent(True, allocation, size, self._stream))
        if tag is not None:
            self.trace.tags[allocation] = tag
        elif self._communication or self._stream != DEFAULT_STREAM:
            self.trace.tags[allocation] = "communication"
        else:
            self.trace.tags[allocation] = "temporary"
            self._phase_allocations.append(allocation)
        return allocation

    def _free(self, allocation: int) -> None:
        self.trace.events.append(TraceEvent(False, allocation, 0, ""))

    def _resized(self, storage: Any, size: int) -> None:
        """FSDP2 frees a gathered parameter by resizing its storage to 0 and gathers into it by resizing back."""
        holder = self._holder(storage)
        self._free_current(holder)
        if size > 0:
            holder[0] = self._allocate(size, "parameter")

    def _workspace(self, func: Any) -> None:
        if not self.workspace_bytes:
            return
        matmul = self._matmul.get(func)
        if matmul is None:
            matmul = self._matmul[func] = getattr(func, "__name__", "").split(".")[0] in MATMULS
        if not matmul:
            return
        key = (self._in_backward, self._stream)
        if key not in self._workspaces:
            self._workspaces.add(key)
            self._allocate(self.workspace_bytes, "workspace")  # never freed: cached per thread and stream

    def _attention_workspace(self, func: Any, args: tuple[Any, ...]) -> None:
        """The flash backward's scratch (CUDA targets, as the cuBLAS workspace marks them): allocated after its
        outputs, freed as it returns."""
        if not self.workspace_bytes or getattr(func, "__name__", "").split(".")[0] not in FLASH_BACKWARD:
            return
        batch, heads, seq_q, head_dim = args[1].shape  # the query, (batch, heads, seq, head dim)
        seq_rounded = -(-seq_q // 128) * 128
        dim8 = -(-head_dim // 8) * 8
        multiple = 32 if dim8 <= 128 else 64
        dim_rounded = -(-dim8 // multiple) * multiple
        scratch = [self._allocate(4 * batch * seq_rounded * heads * dim_rounded, "attention workspace"),
                   self._allocate(4 * batch * heads * seq_rounded, "attention workspace")]
        for allocation in scratch:
            self._free(allocation)

    def _known(self, tensor: Any) -> int | None:
        holder = self._ids.get(tensor.untyped_storage())
        return None if holder is None else holder[0]

    def _record_op(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        """The op's record (device/ops.py): what it computes and moves, and the storages it reads and writes."""
        import torch
        from torch.utils._pytree import tree_flatten

        info = op_info(func)
        kind, base = info.kind, info.base
        if kind == OpKind.FREE:
            return
        inputs = [v for v in tree_flatten((args, kwargs))[0] if isinstance(v, torch.Tensor)]
        outputs = [out] if isinstance(out, torch.Tensor) else [v for v in tree_flatten(out)[0]
                                                              if isinstance(v, torch.Tensor)]
        if info.writes:
            mutated = tree_flatten(mutated_arguments(func, args, kwargs))[0]
            outputs += [v for v in mutated if isinstance(v, torch.Tensor)]
        reads = tuple(dict.fromkeys(i for i in map(self._known, inputs) if i is not None))
        writes = tuple(dict.fromkeys(i for i in map(self._known, outputs) if i is not None))
        floating = next((t.dtype for t in inputs if t.is_floating_point()), None)
        dtype = DTYPE_NAMES.get(str(floating), "fp32")
        if kind == OpKind.COLLECTIVE:
            moved, flops, mnk, group = collective_bytes(base, inputs), 0, None, collective_ranks(args)
            name = COLLECTIVES[base]
        else:
            moved = sum(map(tensor_bytes, inputs)) + sum(map(tensor_bytes, outputs))
            flops = flops_of(func, kind, base, args, kwargs, out)
            mnk = matmul_dims(base, args) if kind == OpKind.MATMUL else None
            group, name = None, info.name
        key = spec = None
        if self.keeps_specs and kind != OpKind.COLLECTIVE:
            from optprof.device.local_times import op_spec

            key, spec = op_spec(func, args, kwargs)
        self.trace.ops.append(OpRecord(name, kind, self._stream, self._phase, flops, moved, dtype, reads, writes,
                                       mnk, group, key, spec))

    # ------------------------------------------------------------------------------------------------ hooks
    @contextlib.contextmanager
    def recording(self) -> Iterator[AllocationTrace]:
        import torch
        from torch.distributed.fsdp._fully_shard import _fsdp_collectives
        from torch.distributed.tensor import DTensor
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        recorder = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
                if any(t is DTensor for t in types):
                    # as MemTracker.__torch_dispatch__ (torch/distributed/_tools/mem_tracker.py): modes run before
                    # subclasses, so DTensor (FSDP2's sharded parameters, gradients and state) is let run and
                    # desugar into the local ops on each rank's shards, which come back here to be recorded
                    return NotImplemented
                recorder._workspace(func)
                out = func(*args, **(kwargs or {}))
                if isinstance(out, torch.Tensor):  # most ops: one tensor, no flattening needed
                    recorder._see(out.untyped_storage())
                else:
                    for value in tree_flatten(out)[0]:
                        if isinstance(value, torch.Tensor):
                            recorder._see(value.untyped_storage())
                recorder._attention_workspace(func, args)
                if recorder.records_ops:
                    recorder._record_op(func, args, kwargs or {}, out)
                return out

        original_resize = torch.UntypedStorage.resize_
        original_stream = torch.cpu.stream
        mixins: list[Any] = [cls for cls in vars(_fsdp_collectives).values()
                  if isinstance(cls, type) and "allocate" in vars(cls)]
        originals: dict[Any, Any] = {cls: cls.allocate for cls in mixins}

        def resize(storage: Any, size: int) -> Any:
            result = original_resize(storage, size)
            recorder._resized(storage, int(size))
            return result

        @contextlib.contextmanager
        def stream(stream: Any) -> Iterator[None]:
            previous = recorder._stream
            recorder._stream = recorder._stream_names.get(id(stream), previous)
            try:
                with original_stream(stream):
                    yield
            finally:
                recorder._stream = previous

        def communication(original: Any) -> Any:
            def allocate(*args: Any, **kwargs: Any) -> Any:
                recorder._communication += 1
                try:
                    return original(*args, **kwargs)
                finally:
                    recorder._communication -= 1
            return allocate

        torch.UntypedStorage.resize_ = resize  # type: ignore[method-assign,assignment]
        torch.cpu.stream = stream
        for cls, original in originals.items():
            cls.allocate = communication(original)
        try:
            with Mode():
                yield self.trace
        finally:
            self._ended = True
            torch.UntypedStorage.resize_ = original_resize  # type: ignore[method-assign]
            torch.cpu.stream = original_stream
            for cls, original in originals.items():
                cls.allocate = original
