"""run_each: the same results serially and in forked workers, a row for a worker that died, and pieces a result
made needless left unrun."""

from __future__ import annotations

import functools
import os
import signal

from optprof.processes.forked import run_each


def squared(index: int, here: bool) -> tuple[int, bool]:
    return index * index, here


def test_serial_and_forked_give_the_same_results_in_index_order() -> None:
    arrived: list[int] = []
    forked = run_each(squared, 5, jobs=2, died=lambda i: (-1, False), on_result=lambda i, r: arrived.append(i),
                      order=[4, 3, 2, 1, 0])
    serial = run_each(squared, 5, jobs=1, died=lambda i: (-1, True))
    assert [value for value, _ in forked] == [value for value, _ in serial] == [0, 1, 4, 9, 16]
    assert {here for _, here in forked} == {False} and {here for _, here in serial} == {True}
    assert sorted(arrived) == [0, 1, 2, 3, 4]  # each result announced once


def test_pieces_a_result_made_needless_are_not_run_serially_or_forked() -> None:
    """As plan prunes a strategy once its least-memory setup does not fit: after piece 0's result, pieces 5-9 are
    needless; those not yet begun are not run and get the caller's row (forked, a worker may have taken a few)."""
    for always_fork in (False, True):
        arrived: list[int] = []
        results = run_each(squared, 10, 1, died=lambda i: (-1, False), on_result=functools.partial(_arrived, arrived),
                           always_fork=always_fork, skip=functools.partial(_after_zero, arrived))
        assert results[0][0] == 0 and results[9] == (-1, False), always_fork
        assert 9 not in arrived


def _arrived(arrived: list[int], index: int, result: object) -> None:
    arrived.append(index)


def _after_zero(arrived: list[int], index: int) -> bool:
    return 0 in arrived and index >= 5


def test_a_worker_that_dies_gives_its_row_and_the_rest_are_kept_or_said() -> None:
    def dies_at_two(index: int, here: bool) -> tuple[int, bool]:
        if index == 2 and not here:
            os.kill(os.getpid(), signal.SIGKILL)
        return squared(index, here)

    results = run_each(dies_at_two, 4, jobs=2, died=lambda i: (-i, True))
    assert results[2] == (-2, True)  # the died row, from the caller
    # a killed worker breaks the pool: the pieces still pending are said to have died too, never lost
    assert all(result in ((i * i, False), (-i, True)) for i, result in enumerate(results))
    assert run_each(squared, 0, jobs=2, died=lambda i: (0, True)) == []


def test_every_module_the_fork_server_preloads_exists() -> None:
    """The fork server skips a preload that fails to import, silently: a stale name (`optprof.dist`, renamed in
    the redesign) left every rank's trial to import the rank code itself."""
    import importlib.util

    from optprof.processes.isolated import WARM_MODULES

    assert [name for name in WARM_MODULES if importlib.util.find_spec(name) is None] == []
