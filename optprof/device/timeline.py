"""Step time from the step's ops: a cost per op on a catalog GPU (or measured on this machine), placed on streams.

Cost of one op on a catalog GPU (hardware/catalog.toml):
- matmul: FLOPs / (bf16-or-dtype peak x matmul efficiency x quantization), where quantization is the fraction of
  useful work when the output is cut into tiles and the tiles run in waves over the SMs (NVIDIA's "Matrix
  Multiplication Background User's Guide": tile and wave quantization), taking the tile that wastes least;
- attention: FLOPs (causal: half, device/ops.py) / (peak x attention efficiency);
- everything else: bytes / (memory bandwidth x memory efficiency);
each the roofline max of its compute and memory times (torch/utils/_runtime_estimation.py, as
torch/distributed/_tools/runtime_estimator.py `_roofline_estimate` combines them), and never under the launch time.
- collectives: ring algorithm time from NCCL's bus bandwidth (nccl-tests doc/PERFORMANCE.md: busbw = algbw x
  (n-1)/n for all-gather and reduce-scatter, x 2(n-1)/n for all-reduce) inside a node, or the network's per GPU
  when the group spans nodes, plus a latency per collective.

The timeline: the host issues the ops in the order the step ran them, `launch_s` each. All kernels share the GPU's
compute (one at a time, in issue order); each collective stream runs its collectives in order, beside compute. An op
starts when it is issued, its engine is free, and every storage it reads has been written (a copy-out waits for its
all-gather, a reduce-scatter for the gradients it reduces, the optimizer for the reduced shards). So FSDP2's
prefetched all-gathers and its reduce-scatters overlap compute exactly as far as the step's own order allows, and the
exposed communication is the time compute waits on a collective: the timeline's, not a per-layer formula
(torch/distributed/_tools/fsdp_ilp.py reasons about the same overlap per FSDP unit).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from optprof.device.ops import OpKind, OpRecord
from optprof.hardware.catalog import Cluster, Gpu

PHASES = ("forward", "backward", "optimizer")  # the reported split; "step" ops (before the first forward) count
PHASE_OF = {"step": "forward", "forward": "forward", "backward": "backward", "optimizer step": "optimizer"}
TILES = ((256, 128), (128, 256), (128, 128), (128, 64), (64, 128), (64, 64))  # cuBLAS/CUTLASS CTA tiles (m, n)


@dataclass(frozen=True)
class StepTime:
    """One step's predicted time and its split. Seconds."""

    step_s: float
    phase_s: dict[str, float]  # forward, backward, optimizer, exposed_communication: they add up to step_s
    communication_s: float  # every collective's own time, overlapped or not
    compute_s: float  # every kernel's own time



def quantization(m: int, n: int, sms: int, batch: int = 1) -> float:
    """The best fraction of useful work over TILES: output tiles padded to whole tiles, tiles run in whole waves."""
    best = 0.0
    for tile_m, tile_n in TILES:
        tiles_m, tiles_n = math.ceil(m / tile_m), math.ceil(n / tile_n)
        tiles = tiles_m * tiles_n * batch
        waves = math.ceil(tiles / sms)
        useful = (m * n) / (tiles_m * tile_m * tiles_n * tile_n) * tiles / (waves * sms)
        best = max(best, useful)
    return best


def kernel_seconds(op: OpRecord, gpu: Gpu) -> float:
    """The roofline time of one kernel on `gpu`, launch time as the floor."""
    memory_s = op.bytes / (gpu.memory_bandwidth * gpu.memory_efficiency)
    compute_s = 0.0
    if op.kind == OpKind.MATMUL and op.mnk is not None:
        batch, m, n, _ = op.mnk
        compute_s = op.flops / (gpu.peak(op.dtype) * gpu.matmul_efficiency * quantization(m, n, gpu.sms, batch))
    elif op.kind == OpKind.ATTENTION:
        compute_s = op.flops / (gpu.peak(op.dtype) * gpu.attention_efficiency)
    elif op.flops:
        compute_s = op.flops / gpu.peak("fp32")  # non-matmul arithmetic on CUDA cores
    return max(compute_s, memory_s, gpu.launch_s)


def collective_seconds(op: OpRecord, cluster: Cluster) -> float:
    """Ring time of a collective: latency plus its bus traffic over the slowest link of its group."""
    ranks = op.group or (0,)
    size = len(ranks)
    if size <= 1:
        return 0.0
    nodes = {rank // cluster.gpus_per_node for rank in ranks}
    gpu = cluster.gpu
    if len(nodes) > 1:
        busbw = min(gpu.intra_node_busbw, cluster.network.busbw)
        latency = cluster.network.latency_s
    else:
        busbw, latency = gpu.intra_node_busbw, gpu.intra_node_latency_s
    factor = 2 * (size - 1) / size if op.name == "all-reduce" else (size - 1) / size
    return latency + op.bytes * factor / busbw


Coster = Callable[[OpRecord], float]


def catalog_coster(cluster: Cluster) -> Coster:
    def cost(op: OpRecord) -> float:
        return collective_seconds(op, cluster) if op.kind == OpKind.COLLECTIVE else kernel_seconds(op, cluster.gpu)
    return cost


def _overlap(start: float, end: float, intervals: list[tuple[float, float]]) -> float:
    return sum(max(0.0, min(end, b) - max(start, a)) for a, b in intervals)


def step_time(ops: Sequence[OpRecord], cost: Coster, launch_s: float, overlap: bool = True) -> StepTime:
    """Place the ops on the timeline (see the module's docstring) and split the step: each phase gets its kernels'
    time and the host-bound gaps before them; gaps where compute waits on a running collective are exposed
    communication. Without `overlap` (CPU ranks: gloo's threads take the same cores as compute), each collective
    runs on the compute engine, all of it exposed."""
    host = 0.0
    compute_free = 0.0
    stream_free: dict[str, float] = {}
    ready: dict[int, float] = {}
    collectives: list[tuple[float, float]] = []
    phase_s = dict.fromkeys((*PHASES, "exposed_communication"), 0.0)
    communication_s = compute_s = 0.0
    for op in ops:
        seconds = cost(op)
        depends = max((ready.get(i, 0.0) for i in op.reads), default=0.0)
        if op.kind == OpKind.COLLECTIVE and not overlap:
            host += launch_s
            start = max(host, compute_free, depends)
            end = compute_free = start + seconds
            phase_s["exposed_communication"] += end - max(start, host)
            communication_s += seconds
        elif op.kind == OpKind.COLLECTIVE:
            host += launch_s
            start = max(host, stream_free.get(op.stream, 0.0), depends)
            end = start + seconds
            stream_free[op.stream] = end
            collectives.append((start, end))
            communication_s += seconds
        else:
            host += launch_s
            start = max(host, compute_free, depends)
            gap = start - compute_free
            exposed = _overlap(compute_free, start, collectives) if gap > 0 else 0.0
            phase = PHASE_OF.get(op.phase, "forward")
            phase_s["exposed_communication"] += min(exposed, gap)
            phase_s[phase] += max(0.0, gap - exposed) + seconds
            end = start + seconds
            compute_free = end
            compute_s += seconds
        for written in op.writes:
            ready[written] = end
    finish = max([compute_free, host, *stream_free.values()])
    tail = finish - compute_free  # collectives still running after the last kernel (and the host's last issue)
    phase_s["exposed_communication"] += _overlap(compute_free, finish, collectives) if tail > 0 else 0.0
    phase_s["optimizer"] += max(0.0, tail - _overlap(compute_free, finish, collectives))
    return StepTime(finish, phase_s, communication_s, compute_s)
