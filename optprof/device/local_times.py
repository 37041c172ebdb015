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

PLAIN = (int, float, bool, str, type(None))
REPEAT_S = 0.002  # time each op for at least this long (seconds), in whole runs, after one warm-up run
MAX_RUNS = 20
COLD_BYTES = 64 << 20  # written between CPU runs: more than a server CPU's last-level cache


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
    """Median seconds of one run of the op on `device`; None where it cannot run on made-up values."""
    import torch

    name, arguments = spec
    try:
        func = _resolve(name)
        args, kwargs = _materialize(arguments, device)
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        func(*args, **kwargs)  # warm-up (and the check that it runs at all)
        sync()
        runs: list[float] = []
        while (len(runs) < MAX_RUNS and sum(runs) < REPEAT_S) or len(runs) < 3:
            start = time.perf_counter()
            func(*args, **kwargs)
            sync()
            runs.append(time.perf_counter() - start)
        return statistics.median(runs)
    except Exception:  # an op that needs real values (a scalar read back, an index in range)
        return None


def _cache_file(device: str) -> Any:
    import torch

    name = torch.cuda.get_device_name() if device == "cuda" else f"cpu-{os.cpu_count()}-{torch.get_num_threads()}"
    key = json.dumps({"device": name, "torch": torch.__version__}, sort_keys=True)
    return cache_dir() / f"op-times-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def measured_times(ops: Iterable[OpRecord], device: str) -> dict[str, float | None]:
    """Seconds per op key, from the cache or timed now (outside any fake mode); None: could not be timed."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    path = _cache_file(device)
    try:
        cached: dict[str, float | None] = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    wanted = {op.key: op.spec for op in ops if op.key is not None and op.key not in cached}
    if wanted:
        with unset_fake_temporarily():
            for key, spec in wanted.items():
                cached[key] = time_op(spec, device)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_suffix(f".{os.getpid()}.tmp")
            temporary.write_text(json.dumps(cached))
            os.replace(temporary, path)  # whole or not at all
        except OSError:
            pass  # a read-only cache costs a re-timing next time, nothing else
    return cached
