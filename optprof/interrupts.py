"""SIGINT and SIGTERM (Ctrl-C; what SLURM preemption and CI time limits send) as an exception the commands catch,
so that the rows finished so far are printed and saved, the rest marked `interrupted`, every child process stopped
and waited for, and the exit code 130 or 143. A second signal stops at once.

Children never see the signal as theirs to act on: each ignores SIGINT (a terminal's Ctrl-C reaches the whole
process group) and dies quietly on SIGTERM, which is how the parent stops them (`in_child`).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.forkserver
import multiprocessing.resource_tracker
import os
import signal
import threading
import time
from collections.abc import Iterator
from types import FrameType

SIGNALS = (signal.SIGINT, signal.SIGTERM)
STOP_GRACE_S = 2.0  # a child stopped with SIGTERM gets this long to go before SIGKILL
REAP_S = 0.5  # after a second signal: how long to wait for SIGKILLed children to be reaped

_received: list[int] = []  # the signals this process took, in order
_forked: set[int] = set()  # children forked with os.fork (not multiprocessing's), still running


class Interrupted(BaseException):
    """A signal asked this process to stop; BaseException, like KeyboardInterrupt, so that no `except Exception`
    turns it into a row's failure."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal.Signals(signum).name)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


def _on_signal(signum: int, frame: FrameType | None) -> None:
    if _received:  # the second signal: stop now, children first
        _kill_children()
        os._exit(128 + signum)
    _received.append(signum)
    raise Interrupted(signum)


def _kill_children() -> None:
    """SIGKILL to every child, taking no lock and waiting for nothing: the first signal's cleanup may hold
    multiprocessing's locks when a second signal arrives. The fork server and the resource tracker end on their
    own once this process is gone (their pipes close)."""
    pids = {child.pid for child in multiprocessing.active_children()} | _forked
    helpers = (getattr(multiprocessing.forkserver, "_forkserver", None),
               getattr(multiprocessing.resource_tracker, "_resource_tracker", None))
    pids |= {getattr(helper, "_forkserver_pid", None) or getattr(helper, "_pid", None) for helper in helpers}
    killed = [pid for pid in pids if pid]
    for pid in killed:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + REAP_S
    while killed and time.monotonic() < deadline:  # reap them, so that none is left even as a zombie
        for pid in list(killed):
            with contextlib.suppress(ChildProcessError, OSError):
                if os.waitpid(pid, os.WNOHANG)[0] == 0:
                    continue
            killed.remove(pid)
        time.sleep(0.005)


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Take SIGINT and SIGTERM as `Interrupted` for the duration (main thread only: signals arrive there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {sig: signal.getsignal(sig) for sig in SIGNALS}
    _received.clear()
    for sig in SIGNALS:
        signal.signal(sig, _on_signal)
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def held_signals(what: str) -> Iterator[None]:
    """Under `interruptible`, SIGINT and SIGTERM that arrive during the body are held until it ends, then raised as
    `Interrupted`; a second one stops at once, as ever. For a fake step run in this process: its Python code runs
    inside torch's C++ (dispatch, a tensor's deallocation), and an exception raised there by a signal handler can
    end in std::terminate (compare's parent aborted so, once in CI: "terminate called after throwing an instance
    of 'python_error'")."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not _on_signal:
        yield
        return
    held: list[int] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        if held or _received:
            _kill_children()
            os._exit(128 + signum)
        held.append(signum)
        os.write(2, f"{signal.Signals(signum).name}: stopping after {what} (again to stop now)\n".encode())

    for sig in SIGNALS:
        signal.signal(sig, hold)
    try:
        yield
    finally:
        for sig in SIGNALS:
            signal.signal(sig, _on_signal)
        if held:  # the signal wins over whatever the body raised
            _received.append(held[0])
            raise Interrupted(held[0])


def in_child() -> None:
    """In a child process, first thing: the parent decides about signals; SIGTERM (the parent stopping it) ends it
    without a traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _received.clear()
    _forked.clear()


def forked(pid: int) -> None:
    """An os.fork child to stop with the others on an interrupt."""
    _forked.add(pid)


def reaped(pid: int) -> None:
    _forked.discard(pid)


def stop_children(grace_s: float = STOP_GRACE_S, helpers: bool = True) -> None:
    """Stop every child this process started (multiprocessing's and os.fork's) and wait for each: SIGTERM, then
    SIGKILL after `grace_s`. With `helpers`, also the fork server and the resource tracker, which would outlive
    nothing else (a run that goes on after a time limit keeps them)."""
    children = multiprocessing.active_children()
    for child in children:
        with contextlib.suppress(OSError):
            child.terminate()
    for pid in list(_forked):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
    for child in children:
        child.join(grace_s)
        if child.is_alive():
            child.kill()
            child.join()
    for pid in list(_forked):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, 0)
        _forked.discard(pid)
    if helpers:
        _stop_helpers()


def _stop_helpers() -> None:
    """multiprocessing's fork server and resource tracker: stopped and waited for (each has a `_stop`)."""
    from multiprocessing import forkserver, resource_tracker

    for helper in (getattr(forkserver, "_forkserver", None), getattr(resource_tracker, "_resource_tracker", None)):
        stop = getattr(helper, "_stop", None)
        if stop is not None:
            with contextlib.suppress(Exception):
                stop()


class TimeLimit(BaseException):
    """Work in this process ran past its time limit (`time_limit`); BaseException so that no `except Exception`
    around a fake step turns it into that step's failure."""


@contextlib.contextmanager
def time_limit(seconds: float, what: str) -> Iterator[None]:
    """Raise TimeLimit in this (main) thread if the body runs longer than `seconds` (SIGALRM): a fake step that
    never ends (a model's init looping on values a fake tensor does not have) becomes a reason, not a hang.
    Children forked inside are stopped by the caller's handler. Elsewhere than the main thread: no limit."""
    if threading.current_thread() is not threading.main_thread() or seconds <= 0:
        yield
        return

    def expired(signum: int, frame: FrameType | None) -> None:
        raise TimeLimit(f"{what} did not end within {seconds:g} s")

    before = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, before)
