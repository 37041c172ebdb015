"""Independent pieces of work at once, in forked worker processes: the optimizers of state-size and predict,
tune's trials, the profiles of check (`run_each`: serially or forked, and a worker that died still gives a row).
Fork, so that the workers share what the parent already built (a meta model, imported packages) without pickling
it; only where nothing has started CUDA (meta and fake tensors are CPU-side)."""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from optprof.interrupts import Interrupted, in_child, stop_children

# The work of the pool being run: set just before the pool forks, so each worker finds it in its own memory.
_work: Callable[[int], Any] | None = None


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch's intra-op threads set to `threads` inside, and back to what they were after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def in_forked_child() -> None:
    """First thing in a forked child: signals as `in_child` sets them, and what the parent built frozen out of the
    garbage collector's reach. A collection in the child would otherwise walk every object it inherited, writing to
    each one's page (copy-on-write): about a third of a fake step's CPU in a plan's children."""
    in_child()
    gc.freeze()


def can_fork() -> bool:
    return "fork" in multiprocessing.get_all_start_methods()


def _run(index: int) -> Any:
    import torch

    torch.set_num_threads(1)  # the workers share the cores
    assert _work is not None
    return _work(index)


def forked_map(work: Callable[[int], Any], order: Iterable[int], jobs: int,
               on_result: Callable[[int, Any], None], skip: Callable[[int], bool] | None = None) -> dict[int, Any]:
    """work(i) for each i of `order` (submitted in that order, one per free worker) in `jobs` forked workers; the
    results by index, each passed to on_result as it arrives. An index whose worker died (a crash, the OOM killer)
    is missing, and so is every one not yet begun then: the caller says so in its row, or runs it again where the
    error can show. A piece for which `skip(i)` holds when a worker is free for it is not run (missing too: what
    a result made needless, as plan prunes)."""
    global _work
    _work = work
    results: dict[int, Any] = {}
    waiting = list(order)
    try:
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork"),
                                 initializer=in_forked_child) as pool:
            running: dict[Future[Any], int] = {}

            def submit() -> None:  # one piece per free worker, so that `skip` decides each with every result so far
                while waiting and len(running) < jobs:
                    index = waiting.pop(0)
                    if skip is None or not skip(index):
                        running[pool.submit(_run, index)] = index

            try:
                submit()
                while running:
                    done, _ = wait(running, return_when=FIRST_COMPLETED)
                    for future in done:
                        index = running.pop(future)
                        try:
                            results[index] = future.result()
                        except BrokenProcessPool:  # a worker died: the pool takes nothing more
                            waiting.clear()
                            continue
                        on_result(index, results[index])
                    submit()
            except Interrupted:  # stop the workers now: leaving the pool would wait for their work to end
                pool.shutdown(wait=False, cancel_futures=True)
                stop_children(grace_s=0.0)
                raise
    finally:
        _work = None
    return results


R = TypeVar("R")


def run_each(work: Callable[[int, bool], R], count: int, jobs: int, died: Callable[[int], R],
             on_result: Callable[[int, R], None] | None = None, order: Sequence[int] | None = None,
             always_fork: bool = False, skip: Callable[[int], bool] | None = None) -> list[R]:
    """[work(i, here) for i in range(count)]: in `jobs` forked workers where that helps (or `always_fork`, so that
    every piece runs alike) and the platform can fork; else one after another in this process (in `order`).
    `here` tells work whether it runs in this process (where it may report progress). `order` is the order of
    submission to the workers (longest first packs them best). A piece whose worker died gives `died(i)`: the
    caller's row saying so, or the piece run again here, where its error can show. A piece for which `skip(i)`
    holds once an earlier result is in is not run (where it can still be held back; `died(i)` then too)."""
    found: dict[int, R] = {}
    notify = on_result or (lambda index, result: None)
    if count and can_fork() and (always_fork or min(jobs, count) > 1):
        found = forked_map(lambda index: work(index, False), order if order is not None else range(count),
                           max(1, min(jobs, count)), notify, skip)
    else:
        for index in order if order is not None else range(count):
            if skip is not None and skip(index):
                continue
            found[index] = work(index, True)
            notify(index, found[index])
    return [found[index] if index in found else died(index) for index in range(count)]
