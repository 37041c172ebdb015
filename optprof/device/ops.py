"""The ops of a step on fake tensors, as a GPU would run them: what each op is, its FLOPs and the bytes it moves,
its stream and phase, and the storages it reads and writes (so a timeline can order ops across streams).

FLOPs come from torch's own counter (torch/utils/flop_counter.py: `flop_registry`, as `FlopCounterMode._count_flops`
calls it), with the CPU flash-attention ops that a fake step on CPU runs counted by the same formulas
(`sdpa_flop_count`, `sdpa_backward_flop_count`) and halved when causal, since flash kernels skip the masked half.
Bytes follow torch/utils/_runtime_estimation.py: `get_num_bytes` (a broadcast dimension, stride 0, is read once)
over inputs and outputs; views and tensor creation move nothing (`_IGNORE_OPS` there).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class OpKind(StrEnum):
    MATMUL = "matmul"  # mm, addmm, bmm, baddbmm, _scaled_mm: tensor cores, tile and wave quantization
    ATTENTION = "attention"  # fused (flash) attention, forward or backward
    MEMORY = "memory"  # everything else that runs a kernel: elementwise, reductions, copies, foreach ops
    COLLECTIVE = "collective"  # all-gather, reduce-scatter, all-reduce over a process group
    FREE = "free"  # views, metadata, tensor creation without a fill: no kernel


COLLECTIVES = {"_allgather_base_": "all-gather", "allgather_into_tensor_coalesced_": "all-gather",
               "_reduce_scatter_base_": "reduce-scatter", "reduce_scatter_tensor_coalesced_": "reduce-scatter",
               "allreduce_": "all-reduce", "allreduce_coalesced_": "all-reduce", "allgather_": "all-gather",
               "reduce_scatter_": "reduce-scatter"}
MATMUL_OPS = ("mm", "addmm", "bmm", "baddbmm", "_scaled_mm")
ATTENTION_FORWARD = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
                     "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention")
FREE_OPS = frozenset((
    # torch/utils/_runtime_estimation.py: _VIEW_OPS and _CREATE_OPS, plus metadata and allocation-only ops
    "lift_fresh", "t", "transpose", "view", "detach", "_unsafe_view", "split", "adjoint", "as_strided", "diagonal",
    "expand", "expand_as", "movedim", "permute", "select", "squeeze", "mT", "mH", "real", "imag", "view_as",
    "unflatten", "unfold", "unbind", "unsqueeze", "vsplit", "hsplit", "split_with_sizes", "swapaxes", "swapdims",
    "chunk", "randint", "randn", "rand", "randn_like", "rand_like", "randint_like", "arange", "alias", "slice",
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "device", "_reshape_alias",
    "_record_function_enter_new", "_record_function_exit", "_local_scalar_dense", "set_", "resize_", "sym_size",
    "sym_stride", "sym_numel", "is_same_size", "_has_compatible_shallow_copy_type", "wait_tensor",
))


@dataclass(frozen=True, slots=True)
class OpRecord:
    """One op of the step. `reads` and `writes` are allocation ids of the trace (device/trace.py)."""

    name: str  # aten overload, e.g. "aten.mm.default"
    kind: OpKind
    stream: str
    phase: str  # forward, backward (recomputation included), optimizer step, or step (before the first forward)
    flops: int
    bytes: int  # read plus written, bytes
    dtype: str  # the compute dtype (bf16, fp32, ...): the first floating input's
    reads: tuple[int, ...]
    writes: tuple[int, ...]
    mnk: tuple[int, int, int, int] | None = None  # matmuls: (batch, m, n, k)
    group: tuple[int, ...] | None = None  # collectives: the process group's global ranks
    key: str | None = None  # what identifies the op for measured times: name, shapes, strides, dtypes, scalars
    spec: Any = None  # what rebuilds the op's arguments for timing it (device/local_times.py), where kept


def with_ids(op: OpRecord, reads: tuple[int, ...], writes: tuple[int, ...]) -> OpRecord:
    """`op` reading and writing other allocations (a trace renumbered): dataclasses.replace, a third of its cost."""
    return OpRecord(op.name, op.kind, op.stream, op.phase, op.flops, op.bytes, op.dtype, reads, writes, op.mnk,
                    op.group, op.key, op.spec)


DTYPE_NAMES = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float64": "fp64",
               "torch.float8_e4m3fn": "fp8", "torch.float8_e5m2": "fp8"}


def tensor_bytes(tensor: Any) -> int:
    """Bytes an op touches in `tensor`: a stride-0 (broadcast) dimension once (_runtime_estimation.get_num_bytes)."""
    count = 1
    for size, stride in zip(tensor.shape, tensor.stride(), strict=True):
        if stride != 0:
            count *= int(size)
    return count * tensor.element_size()


def _attention_flops(base: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    if base.endswith("_backward"):
        grad_out, query, key, value = args[:4]
        flops = sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)
        causal = kwargs.get("is_causal", args[7] if len(args) > 7 and isinstance(args[7], bool) else False)
    else:
        query, key, value = args[:3]
        flops = sdpa_flop_count(query.shape, key.shape, value.shape)
        causal = kwargs.get("is_causal", args[4] if len(args) > 4 and isinstance(args[4], bool) else False)
    return flops // 2 if causal else flops


def kind_of(base: str, namespace: str) -> OpKind:
    if namespace == "c10d" and base in COLLECTIVES:
        return OpKind.COLLECTIVE
    if base in MATMUL_OPS:
        return OpKind.MATMUL
    if base.removesuffix("_backward") in ATTENTION_FORWARD:
        return OpKind.ATTENTION
    if base in FREE_OPS or namespace in ("prim", "profiler", "c10d"):
        return OpKind.FREE
    return OpKind.MEMORY


def flops_of(func: Any, kind: OpKind, base: str, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> int:
    if kind == OpKind.ATTENTION:
        return _attention_flops(base, args, kwargs)
    from torch.utils.flop_counter import flop_registry

    formula = flop_registry.get(func._overloadpacket)
    if formula is None:
        return 0
    return int(formula(*args, **kwargs, out_val=out))


def matmul_dims(base: str, args: tuple[Any, ...]) -> tuple[int, int, int, int] | None:
    """(batch, m, n, k) of a matmul op's operands."""
    if base in ("mm", "_scaled_mm"):
        a, b = args[0], args[1]
    elif base in ("addmm", "baddbmm"):
        a, b = args[1], args[2]
    else:  # bmm
        a, b = args[0], args[1]
    if a.dim() == 3:
        return int(a.shape[0]), int(a.shape[1]), int(b.shape[2]), int(a.shape[2])
    return 1, int(a.shape[0]), int(b.shape[1]), int(a.shape[1])


def collective_ranks(args: tuple[Any, ...]) -> tuple[int, ...]:
    """The global ranks of a c10d op's process group (its ScriptObject argument)."""
    import torch.distributed as dist

    for value in args:
        if type(value).__name__ in ("ProcessGroup", "ScriptObject"):
            try:
                group = dist.ProcessGroup.unbox(value) if type(value).__name__ == "ScriptObject" else value
                return tuple(dist.get_process_group_ranks(group))
            except Exception:  # a group this process cannot name: its size is all there is
                size = int(value.size()) if hasattr(value, "size") else 1
                return tuple(range(size))
    return (0,)


def collective_bytes(base: str, tensors: list[Any]) -> int:
    """The bytes a collective moves in nccl-tests' terms: the gathered output of an all-gather, the input of a
    reduce-scatter, the buffer of an all-reduce (nccl-tests doc/PERFORMANCE.md's `size`)."""
    if COLLECTIVES[base] == "all-gather":
        return tensor_bytes(tensors[0])  # (output, input)
    if COLLECTIVES[base] == "reduce-scatter":
        return tensor_bytes(tensors[1]) if len(tensors) > 1 else tensor_bytes(tensors[0])  # (output, input)
    return sum(tensor_bytes(t) for t in tensors)


@dataclass(frozen=True)
class OpInfo:
    """What a recorder needs of an op overload, read once per overload: its name ("aten.mm.default"), its base
    name ("mm"), its kind, and the arguments it writes in place (position, name, keyword-only)."""

    name: str
    base: str
    kind: OpKind
    writes: tuple[tuple[int, str, bool], ...]


_OP_INFO: dict[Any, OpInfo] = {}


def op_info(func: Any) -> OpInfo:
    info = _OP_INFO.get(func)
    if info is None:
        name = str(func)
        namespace, _, rest = name.partition(".")
        base = rest.split(".")[0]
        writes = tuple((position, argument.name, argument.kwarg_only)
                       for position, argument in enumerate(func._schema.arguments)
                       if argument.alias_info is not None and argument.alias_info.is_write)
        info = _OP_INFO[func] = OpInfo(name, base, kind_of(base, namespace), writes)
    return info


def mutated_arguments(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
    """The arguments an op writes in place, by its schema's alias annotations (`Tensor(a!)`): in-place and foreach
    ops return nothing or their first argument, and fused optimizers write every state list they take."""
    written = []
    for position, name, kwarg_only in op_info(func).writes:
        if kwarg_only or position >= len(args):
            if name in kwargs:
                written.append(kwargs[name])
        else:
            written.append(args[position])
    return written
