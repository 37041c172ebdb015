"""What a CUDA device holds outside PyTorch's caching allocator, per rank: named, sized and sourced, by GPU kind
(the hardware catalog's `context_mib`, `nccl_channels`, `nvls_channels`) and by the rank's communicators.

None of it is measured here (there is no GPU). `--reserve` replaces them all with one figure of the user's;
`--calibration FILE.json` with what a compare on the card measured (NVML's process memory less the allocator's
reserved bytes: `outside_allocator_bytes`). Without `--gpu`, one generic figure per item stands in.
"""

from __future__ import annotations

from dataclasses import dataclass

from optprof.config import Strategy, mesh_shape
from optprof.hardware.catalog import Gpu

MIB = 1 << 20
GENERIC_CONTEXT_BYTES = 512 * MIB  # no --gpu: the primary context with lazy module loading (0.3-0.7 GB reported)
GENERIC_COMMUNICATOR_BYTES = 512 * MIB  # no --gpu: a communicator at NCCL's default buffers, about 0.5 GB on NVLink
CHANNEL_BYTES = 12 * MIB  # one ring channel's connection buffers on the GPU (catalog.toml: NCCL)
NVLS_BYTES = 2 * 128 * 1024 * 8  # NVLS buffers per channel and GPU of the node (ncclNvlsBufferSetup): 2 MiB
SM90_WORKSPACE_BYTES = 32 * MIB  # cuBLAS's workspace on sm90 (no --gpu: the allocator model assumes an H100)


@dataclass(frozen=True)
class OutsideCost:
    name: str
    bytes: int
    source: str


@dataclass(frozen=True)
class Group:
    """A communicator a rank holds: its ranks, and how many of them share this rank's node."""

    size: int
    local: int
    world: bool = False  # the default group, beside a 2-D mesh's own groups


def communicator_groups(mesh: tuple[int, ...], gpus_per_node: int) -> list[Group]:
    """The NCCL communicators a rank holds: one per mesh dimension with several ranks (FSDP2's reduce-scatter and
    all-gather share their dimension's), and with a 2-D mesh the world group too (a 1-D mesh over every rank is
    the default group itself: DeviceMesh reuses it). Ranks are numbered node by node; the last dimension is
    contiguous, an earlier one strided by the sizes after it."""
    groups = []
    stride = 1
    for size in reversed(mesh):
        if size > 1:
            local = max(1, min(size, gpus_per_node // stride)) if stride < gpus_per_node else 1
            groups.append(Group(size, local))
        stride *= size
    groups.reverse()
    if len(groups) > 1:
        groups.append(Group(stride, min(stride, gpus_per_node), world=True))
    return groups


def communicator_bytes(gpu: Gpu, group: Group) -> tuple[int, str]:
    """One communicator on `gpu`: its ring buffers, and NVLS's where the node has NVLink SHARP and the group has
    several GPUs on it (NVLS buffers scale with those GPUs)."""
    ring = gpu.nccl_channels * CHANNEL_BYTES
    parts = [f"{gpu.nccl_channels} ring channels x 12 MiB" if ring else "ring buffers in host memory (SHM)"]
    nvls = gpu.nvls_channels * NVLS_BYTES * group.local if group.local > 1 else 0
    if nvls:
        parts.append(f"NVLS {gpu.nvls_channels} channels x 2 MiB x {group.local} GPUs of the node")
    return ring + nvls, " + ".join(parts)


def outside_costs(groups: list[Group], gpu: Gpu | None = None) -> tuple[OutsideCost, ...]:
    """Per rank: the CUDA context, and each NCCL communicator (catalog figures with `gpu`, else generic)."""
    if gpu is None:
        costs = [OutsideCost("CUDA context", GENERIC_CONTEXT_BYTES,
                             "assumed (no --gpu): the primary context with CUDA's lazy module loading (reported "
                             "0.3-0.7 GB)")]
        if groups:
            costs.append(OutsideCost(
                f"NCCL communicators ({len(groups)})", len(groups) * GENERIC_COMMUNICATOR_BYTES,
                "assumed (no --gpu): 0.5 GB each at NCCL's default buffers (NCCL_BUFFSIZE 4 MiB per channel and "
                "peer), one per mesh dimension with several ranks"))
        return tuple(costs)
    costs = [OutsideCost("CUDA context", gpu.context_bytes, gpu.sources.get("context_mib", "catalog"))]
    for group in groups:
        total, how = communicator_bytes(gpu, group)
        name = f"NCCL {'world group' if group.world else 'communicator'} ({group.size} ranks)"
        why = ("; assumed: a barrier or all-reduce runs on the default group, whose communicator NCCL creates "
               "on that first collective" if group.world else "")
        costs.append(OutsideCost(name, total, f"{how}; {gpu.sources.get('nccl_channels', 'catalog')}{why}"))
    return tuple(costs)


def rank_costs(strategy: Strategy, ranks: int, shard_size: int | None, gpu: Gpu | None = None,
               gpus_per_node: int = 8) -> tuple[OutsideCost, ...]:
    """`outside_costs` for a rank of this strategy's mesh."""
    return outside_costs(communicator_groups(mesh_shape(strategy, ranks, shard_size), gpus_per_node), gpu)


def calibrated_cost(path: str, measured: int) -> OutsideCost:
    """The outside costs as one figure a compare on the card measured (--calibration)."""
    return OutsideCost("measured outside the allocator", measured,
                       f"--calibration {path}: NVML process memory less torch's max reserved, as compare measured "
                       "it on the card, the largest over its rows and ranks")
