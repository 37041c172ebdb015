"""Independent pieces of work at once, in forked worker processes: the optimizers of state-size and predict,
the profiles of check. Fork, so that the workers share what the parent already built (a meta model, imported
packages) without pickling it; only where nothing has started CUDA (meta and fake tensors are CPU-side)."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from typing import Any

# The work of the pool being run: set just before the pool forks, so each worker finds it in its own memory.
_work: Callable[[int], Any] | None = None


def can_fork() -> bool:
    return "fork" in multiprocessing.get_all_start_methods()


def _run(index: int) -> Any:
    import torch

    torch.set_num_threads(1)  # the workers share the cores
    assert _work is not None
    return _work(index)


def forked_map(work: Callable[[int], Any], order: Iterable[int], jobs: int,
               on_result: Callable[[int, Any], None]) -> dict[int, Any]:
    """work(i) for each i of `order` (submitted in that order) in `jobs` forked workers; the results by index,
    each passed to on_result as it arrives. An index whose worker died (a crash, the OOM killer) is missing:
    the caller says so in its row, or runs it again where the error can show."""
    global _work
    _work = work
    results: dict[int, Any] = {}
    try:
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            futures = {pool.submit(_run, index): index for index in order}
            for future in as_completed(futures):
                try:
                    results[futures[future]] = future.result()
                except BrokenProcessPool:
                    continue
                on_result(futures[future], results[futures[future]])
    finally:
        _work = None
    return results
