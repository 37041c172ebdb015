"""What a CUDA device holds outside PyTorch's caching allocator, per rank: named, sized and sourced. None of it is
measured here (there is no GPU); `--reserve` replaces them all with one figure of the user's, and a compare on the
card measures the real total (NVML's process memory less the allocator's reserved bytes)."""

from __future__ import annotations

from dataclasses import dataclass

from optprof.config import Strategy, mesh_shape

MIB = 1 << 20
CUDA_CONTEXT_BYTES = 512 * MIB  # the primary context with lazy module loading: 0.3-0.7 GB as reported
NCCL_COMMUNICATOR_BYTES = 512 * MIB  # per communicator at NCCL's default buffer sizes, about 0.5 GB on NVLink
CUBLAS_WORKSPACE_BYTES = {9: 32 * MIB, 10: 32 * MIB, 12: 32 * MIB}  # by compute capability major; through the allocator
CUBLAS_WORKSPACE_DEFAULT = 4096 * 1024 * 2 + 16 * 1024 * 8  # ':4096:2:16:8' on other cards (8.125 MiB)


@dataclass(frozen=True)
class OutsideCost:
    name: str
    bytes: int
    source: str


def cublas_workspace_bytes(capability_major: int) -> int:
    """cuBLAS's workspace per (thread, stream), allocated through the caching allocator
    (aten/src/ATen/cuda/CublasHandlePool.cpp: parseChosenWorkspaceSize; cuBLASLt shares it by default)."""
    return CUBLAS_WORKSPACE_BYTES.get(capability_major, CUBLAS_WORKSPACE_DEFAULT)


def communicators(mesh: tuple[int, ...]) -> int:
    """NCCL communicators a rank holds: one per mesh dimension with several ranks (FSDP2's reduce-scatter and
    all-gather share their dimension's)."""
    return sum(1 for size in mesh if size > 1)


def outside_costs(communicators: int) -> tuple[OutsideCost, ...]:
    """Per rank: the CUDA context, and one NCCL communicator per mesh dimension that has several ranks."""
    costs = [OutsideCost("CUDA context", CUDA_CONTEXT_BYTES,
                         "assumed: the primary context with CUDA's lazy module loading (reported 0.3-0.7 GB)")]
    if communicators:
        costs.append(OutsideCost(
            f"NCCL communicators ({communicators})", communicators * NCCL_COMMUNICATOR_BYTES,
            "assumed: 0.5 GB each at NCCL's default buffers (NCCL_BUFFSIZE 4 MiB per channel and peer), one per "
            "mesh dimension with several ranks"))
    return tuple(costs)


def rank_costs(strategy: Strategy, ranks: int, shard_size: int | None) -> tuple[OutsideCost, ...]:
    """`outside_costs` for a rank of this strategy's mesh."""
    return outside_costs(communicators(mesh_shape(strategy, ranks, shard_size)))
