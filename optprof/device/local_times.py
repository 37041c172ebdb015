"""Measured op times on this machine's device (`--gpu local`): each distinct op of the traced step (its overload,
shapes, strides, dtypes and scalar arguments) run once on real tensors of those shapes and timed, then fed to the
same timeline as the catalog's costs. Cached per device and installed versions, so a second prediction re-times
nothing. This is how the time model is checked against `compare` on any machine: the timeline and the op list are
the model's, the op times are measured.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from optprof.config import cache_dir
from optprof.device.ops import OpRecord
from optprof.files import read_cache, write_whole

PLAIN = (int, float, bool, str, type(None))
REPEAT_S = 0.01  # time each op for at least this long (seconds), in whole runs, after the warm-up runs
MIN_RUNS, MAX_RUNS = 3, 20
WARM_UP_RUNS = 2  # the first runs of an op pay for fresh pages and lazy initialisation


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: Any  # torch.dtype


def op_spec(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[str | None, Any]:
    """(key, spec): what identifies the op for a measured time, and what rebuilds its arguments; (None, None) for an
    op whose arguments cannot be rebuilt (an object that is neither a tensor nor a plain value)."""
    import torch
    from torch.utils._pytree import tree_flatten, tree_unflatten

    leaves, structure = tree_flatten((args, kwargs))
    rebuilt: list[Any] = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            rebuilt.append(TensorSpec(tuple(map(int, leaf.shape)), tuple(map(int, leaf.stride())), leaf.dtype))
        elif isinstance(leaf, (*PLAIN, torch.dtype, torch.device, torch.layout, torch.memory_format)):
            rebuilt.append(leaf)
        else:
            return None, None
    key = f"{func}|{rebuilt!r}"
    return key, (str(func), tree_unflatten(rebuilt, structure))


def _materialize(spec: Any, device: str) -> Any:
    import torch
    from torch.utils._pytree import tree_map

    def real(leaf: Any) -> Any:
        if isinstance(leaf, torch.device):
            return torch.device(device)
        if not isinstance(leaf, TensorSpec):
            return leaf
        size = 1 + sum((n - 1) * s for n, s in zip(leaf.shape, leaf.stride, strict=True) if n > 0)
        storage = torch.empty(size if all(leaf.shape) else 0, dtype=leaf.dtype, device=device)
        if leaf.dtype.is_floating_point:
            storage.uniform_(0.5, 1.0)  # positive and finite: sqrt, log and division take no NaN or inf path
        else:
            storage.zero_()  # valid indices and targets for every gather, embedding and loss
        return storage.as_strided(leaf.shape, leaf.stride)

    return tree_map(real, spec)


def _resolve(name: str) -> Any:
    import torch

    namespace, packet, overload = name.split(".")
    return getattr(getattr(getattr(torch.ops, namespace), packet), overload)


def time_op(spec: Any, device: str) -> float | None:
    """Seconds of one run of the op on `device`, the fastest of several (anything else running on the machine only
    ever adds time, as timeit's documentation argues); None where it cannot run on made-up values."""
    import torch

    name, arguments = spec
    try:
        func = _resolve(name)
        args, kwargs = _materialize(arguments, device)
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        for _ in range(WARM_UP_RUNS):  # and the check that it runs at all
            func(*args, **kwargs)
        sync()
        runs: list[float] = []
        while (len(runs) < MAX_RUNS and sum(runs) < REPEAT_S) or len(runs) < MIN_RUNS:
            start = time.perf_counter()
            func(*args, **kwargs)
            sync()
            runs.append(time.perf_counter() - start)
        return min(runs)
    except Exception:  # an op that needs real values (a scalar read back, an index in range)
        return None


def _cache_file(device: str) -> Any:
    import torch

    name = torch.cuda.get_device_name() if device == "cuda" else f"cpu-{os.cpu_count()}-{torch.get_num_threads()}"
    key = json.dumps({"device": name, "torch": torch.__version__}, sort_keys=True)
    return cache_dir() / f"op-times-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def measured_times(ops: Iterable[OpRecord], device: str) -> dict[str, float | None]:
    """Seconds per op key, from the cache or timed now (outside any fake mode); None: could not be timed. On CPU,
    with the threads the caller set (ranks that share the cores take fewer each)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    path = _cache_file(device)
    cached = _read_cache(path)
    wanted = {op.key: op.spec for op in ops if op.key is not None and op.key not in cached}
    if wanted:
        with unset_fake_temporarily():
            for key, spec in wanted.items():
                cached[key] = time_op(spec, device)
        _write_cache(path, cached)
    return cached


def _read_cache(path: Any) -> dict[str, float | None]:
    return read_cache(path)  # none yet, or damaged (one warning): time again


def _write_cache(path: Any, cached: dict[str, float | None]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_whole(path, json.dumps(cached).encode())
    except OSError:
        pass  # a read-only cache costs a re-timing next time, nothing else


# ------------------------------------------------------------------------------------------ collectives on CPU ranks
COLLECTIVE_RUNS = 3  # timed runs per collective and size, after one warm-up; the median is kept


def collective_key(op: OpRecord) -> str:
    return f"gloo|{op.name}|{op.bytes}|{len(op.group or (0,))}"


def _time_collectives_on_rank(rank: int, world: int, port: int, wanted: list[tuple[str, str, int]],
                              threads: int, results: Any) -> None:
    """One gloo rank: each (key, kind, bytes) run COLLECTIVE_RUNS times after a warm-up; rank 0 reports medians."""
    import torch
    import torch.distributed as dist

    from optprof.interrupts import in_child

    in_child()
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        found: dict[str, float] = {}
        for key, kind, size in wanted:
            elements = max(world, size // 4 // world * world)  # float32, divisible by the group
            whole, part = torch.ones(elements), torch.ones(elements // world)
            runs = []
            for index in range(COLLECTIVE_RUNS + 1):
                dist.barrier()
                start = time.perf_counter()
                if kind == "all-gather":
                    dist.all_gather_into_tensor(whole, part)
                elif kind == "reduce-scatter":
                    dist.reduce_scatter_tensor(part, whole)
                else:
                    dist.all_reduce(whole)
                if index:
                    runs.append(time.perf_counter() - start)
            found[key] = statistics.median(runs)
        if rank == 0:
            results.put(found)
    finally:
        dist.destroy_process_group()


def measured_collectives(ops: Iterable[OpRecord], threads: int) -> dict[str, float | None]:
    """Seconds of each distinct collective (kind, bytes, group size) of the step on gloo ranks of this machine,
    cached beside the op times: spawned processes, one per rank, each with `threads` threads (as compare's CPU
    ranks share the cores)."""
    import multiprocessing

    from optprof.processes.isolated import free_port

    path = _cache_file("cpu")
    cached = _read_cache(path)
    collectives = {collective_key(op): op for op in ops if op.group and len(op.group) > 1}
    by_world: dict[int, list[tuple[str, str, int]]] = {}
    for key, op in collectives.items():
        if key not in cached:
            by_world.setdefault(len(op.group or ()), []).append((key, op.name, op.bytes))
    context = multiprocessing.get_context("spawn")
    for world, wanted in by_world.items():
        results = context.Queue()
        port = free_port()
        processes = [context.Process(target=_time_collectives_on_rank,
                                     args=(rank, world, port, wanted, threads, results)) for rank in range(world)]
        for process in processes:
            process.start()
        try:
            cached.update(results.get(timeout=300))
        except Exception:  # a rank that could not start: the collectives stay untimed (zero), as the notes say
            cached.update(dict.fromkeys((key for key, _, _ in wanted), None))
        for process in processes:
            process.join(timeout=30)
    if by_world:
        _write_cache(path, cached)
    return {key: cached.get(key) for key in collectives}
