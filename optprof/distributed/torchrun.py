"""Ranks and their process group: how many a trial gets, whether this process already is one (torchrun),
and joining the group."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from optprof.config import DeviceKind
from optprof.errors import UsageError


def share_cores(world_size: int) -> None:
    """CPU ranks on one machine share its cores instead of each taking all of them."""
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))


def torchrun_world_size() -> int | None:
    """The group's size when this process is a torchrun rank (torchrun sets RANK and WORLD_SIZE), else None."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return world if world > 1 and "RANK" in os.environ else None


def torchrun_rank() -> int:
    """This process's rank under torchrun (RANK), 0 outside it: rank 0 predicts, prints and writes the report."""
    value = os.environ.get("RANK", "0")
    return int(value) if torchrun_world_size() is not None and value.isdigit() else 0


def ranks_per_node() -> int | None:
    """torchrun's ranks on this node (LOCAL_WORLD_SIZE), None outside torchrun."""
    value = os.environ.get("LOCAL_WORLD_SIZE")
    return int(value) if value and value.isdigit() else None


def resolve_ranks(kind: DeviceKind, gpus: int | None, device_given: bool = True) -> tuple[int, bool]:
    """(ranks per trial, whether this process is already one rank of a torchrun group) for --gpus.

    Several ranks on the CPU only when asked for (`--device cpu`): without CUDA, `--gpus N` of a large model
    would otherwise start N CPU processes that each hold the whole model, until the kernel kills them.
    """
    import torch

    joined = torchrun_world_size()
    if joined is not None and gpus not in (None, joined):
        raise UsageError(f"--gpus {gpus} under torchrun, whose group has {joined} ranks: drop --gpus")
    world = joined or gpus or 1
    if kind == DeviceKind.CPU and not device_given and joined is None and world > 1:
        raise UsageError(f"--gpus {world}: no CUDA device is available here. Add --device cpu to run {world} CPU "
                         f"ranks (gloo), or run `optprof predict MODEL --gpus {world}` for the per-rank memory "
                         "without a GPU")
    if kind == DeviceKind.CUDA and joined is None and world > torch.cuda.device_count():
        raise UsageError(f"--gpus {world}: only {torch.cuda.device_count()} CUDA devices are visible")
    return world, joined is not None


@contextlib.contextmanager
def torchrun_group(kind: DeviceKind, joined: bool) -> Iterator[None]:
    """Join torchrun's process group for the duration (when `joined`): after the predictions, which run FSDP2 on
    a fake process group of their own in this process."""
    if not joined:
        yield
        return
    import torch
    import torch.distributed as dist

    if kind == DeviceKind.CUDA:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:
        share_cores(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    dist.init_process_group("nccl" if kind == DeviceKind.CUDA else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def same_order(order: list[int], joined: bool) -> list[int]:
    """Rank 0's trial order on every rank of a torchrun group (each rank shuffles on its own; the trials' collectives
    need every rank on the same optimizer)."""
    if not joined:
        return order
    import torch.distributed as dist

    shared: list[object] = [order]
    dist.broadcast_object_list(shared, src=0)
    return list(shared[0])  # type: ignore[call-overload]
