"""One computation forked at a point, each child going on from there with its own branch: predict runs a tracked
step's forward and backward once and forks after backward, one child per optimizer, each of which joins its
optimizer and runs that optimizer's step (commands/fake_step.py). A fork copies the whole process, so each child
goes on with everything the parent built: the fake model, the trackers' state, the allocation trace so far.

The children's results come back to the parent through pipes (pickled); the parent's own computation stops at
the branching point (`Branched`). POSIX only: where there is no fork the caller runs each branch in full.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

from optprof.interrupts import forked, reaped
from optprof.processes.forked import in_forked_child

R = TypeVar("R")


class Branched(Exception):
    """Raised in the parent at the branching point once every child has reported: the parent goes no further."""


def can_branch() -> bool:
    return hasattr(os, "fork")


class Brancher:
    """`fork()` at the branching point: in a child it returns the child's branch index and the child goes on; in
    the parent it runs the `count` children, `jobs` at a time, collects what each delivered, and raises Branched."""

    def __init__(self, count: int, jobs: int) -> None:
        self.count = count
        self.jobs = max(1, jobs)
        self.index: int | None = None  # in a child: its branch
        self.results: dict[int, Any] = {}  # in the parent: by branch; a child that died delivered nothing
        self._write: int | None = None

    def fork(self) -> int:
        running: list[tuple[int, int, int]] = []  # (branch, pid, read end of its pipe)
        for index in range(self.count):
            while len(running) >= self.jobs:
                self._collect(*running.pop(0))
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:  # the child: on from the branching point
                in_forked_child()
                os.close(read)
                self.index, self._write = index, write
                return index
            os.close(write)
            forked(pid)
            running.append((index, pid, read))
        while running:
            self._collect(*running.pop(0))
        raise Branched

    def _collect(self, index: int, pid: int, read: int) -> None:
        with os.fdopen(read, "rb") as pipe:
            data = pipe.read()  # read before waiting: a child blocks on a full pipe
        os.waitpid(pid, 0)
        reaped(pid)
        if data:
            self.results[index] = pickle.loads(data)

    def deliver(self, value: Any) -> NoReturn:
        """In a child: send `value` to the parent and end the process (no cleanup: the parent owns everything)."""
        assert self._write is not None
        code = 0
        try:
            with os.fdopen(self._write, "wb") as pipe:
                pipe.write(pickle.dumps(value))
        except BaseException:  # unpicklable: the parent sees a branch that delivered nothing
            code = 1
        os._exit(code)


def run_branched(compute: Callable[[Brancher], R], count: int, jobs: int,
                 on_error: Callable[[int, BaseException], R]) -> dict[int, R]:
    """`compute(brancher)` calls `brancher.fork()` once, at its branching point; each child's return value (or
    `on_error(branch, exception)`) comes back here, by branch. A branch missing from the result died (a crash, the
    OOM killer). An exception before the branching point is the parent's and propagates."""
    brancher = Brancher(count, jobs)
    try:
        value = compute(brancher)
    except Branched:
        return brancher.results
    except BaseException as exc:
        if brancher.index is None:
            raise
        try:
            outcome = on_error(brancher.index, exc)
        except BaseException:
            os._exit(1)  # a child must never unwind into the parent's code
        brancher.deliver(outcome)
    if brancher.index is None:
        raise RuntimeError("the computation ended without reaching its branching point")
    brancher.deliver(value)
