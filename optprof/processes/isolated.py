"""Run one function in a fresh process, with progress messages, a timeout and crash containment.

A fresh process per trial gives each optimizer a clean allocator (no cached blocks, no fragmentation left
by the one before, no frames of an earlier OOM holding memory) and keeps a segfault, an abort or the
kernel's OOM killer confined to the trial that caused it.

The processes come from multiprocessing's fork server, started once per run with torch, transformers and
optprof's trial code imported (CUDA never initialised there): each trial is a fork of that warm server,
fresh, in a fraction of a second instead of the seconds a spawned interpreter spends importing.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, cast

from optprof.errors import error_text
from optprof.interrupts import in_child


def free_port() -> int:
    """A TCP port free on the loopback now (for a local process group's rendezvous)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])

Target = Callable[[Any, Callable[[str], None]], Any]  # target(argument, progress) -> picklable value

STOP_GRACE_S = 5.0  # after terminate(), before kill()
# Imported once in the fork server: what every trial needs (torch, transformers' model classes, optprof's
# trial and rank code). None of them initialises CUDA at import.
WARM_MODULES = ["torch", "transformers", "transformers.modeling_utils", "transformers.models.auto.modeling_auto",
                "optprof.measure.trial", "optprof.measure.ranks"]


@dataclass(frozen=True)
class Isolated:
    value: Any = None
    error: str | None = None  # why no value came back (crash, timeout, exception)
    killed: bool = False  # SIGKILLed: on Linux most often the kernel's OOM killer


def _child(target: Target, argument: Any, connection: Any) -> None:
    in_child()  # Ctrl-C is the parent's to act on; the parent stops this process with SIGTERM

    def progress(text: str) -> None:
        connection.send(("progress", text))

    try:
        connection.send(("result", target(argument, progress)))
    except BaseException as exc:  # the parent needs a reason, whatever went wrong
        connection.send(("error", error_text(exc)))
    finally:
        connection.close()


def exit_reason(exitcode: int | None) -> str:
    if exitcode is None:
        return "the trial process did not exit"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = " (often the kernel's out-of-memory killer)" if -exitcode == signal.SIGKILL else ""
        return f"the trial process was killed by {name}{hint}"
    return f"the trial process exited with code {exitcode} before reporting a result"


def _stop(process: multiprocessing.process.BaseProcess) -> None:
    if process.is_alive():
        process.terminate()
        process.join(STOP_GRACE_S)
    if process.is_alive():
        process.kill()
    process.join()


def warm_context() -> multiprocessing.context.ForkServerContext | multiprocessing.context.SpawnContext:
    """The fork server's context where the platform has one (Linux, macOS), with WARM_MODULES preloaded;
    else spawn. The server starts at the first trial and lives as long as this process."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(WARM_MODULES)
    return context


def start_warm_server() -> None:
    """Start the fork server now, where there is one: it imports WARM_MODULES in its own process (seconds), which
    then overlaps whatever this process does before its first trial."""
    import multiprocessing.forkserver

    if isinstance(warm_context(), multiprocessing.context.ForkServerContext):
        multiprocessing.forkserver.ensure_running()


def run_isolated(target: Target, argument: Any, timeout_s: float,
                 on_progress: Callable[[str], None] | None = None) -> Isolated:
    """target(argument, progress) in a fresh process; its return value, or the reason there is none.

    Forked from the warm fork server, never from this process: a child forked from here would inherit this
    process's CUDA state and allocator. The child is stopped on timeout, on an exception here (Ctrl-C
    included) and always before returning.
    """
    return run_isolated_group(target, [argument], timeout_s, on_progress)[0]


def run_isolated_group(target: Target, arguments: list[Any], timeout_s: float,
                       on_progress: Callable[[str], None] | None = None) -> list[Isolated]:
    """target(argument, progress) for each argument, each in its own fresh process, all at once (the ranks
    of one distributed trial). When one fails, dies or the time runs out, all are stopped: a group that
    lost a rank would otherwise wait in its next collective until it timed out."""
    context = warm_context()
    processes, receivers = [], []
    for index, argument in enumerate(arguments):
        receiver, sender = context.Pipe(duplex=False)
        process = context.Process(target=_child, args=(target, argument, sender), daemon=True,
                                  name=f"optprof-trial-{index}")
        process.start()
        sender.close()  # so that the child's exit closes the pipe and recv() sees EOF
        processes.append(process)
        receivers.append(receiver)
    group = len(arguments) > 1
    results: dict[int, Isolated] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(results) < len(arguments):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                why = f"timed out after {timeout_s:g} s (--trial-timeout)"
                return [results.get(i) or Isolated(error=why) for i in range(len(arguments))]
            pending = [receivers[i] for i in range(len(arguments)) if i not in results]
            ready = multiprocessing.connection.wait(pending, timeout=min(remaining, 0.5))
            for connection in cast(list[Connection], ready):  # the receivers: waiting returns what it was given
                index = receivers.index(connection)
                prefix = f"rank {index}: " if group else ""
                try:
                    kind, payload = connection.recv()
                except EOFError:  # the child exited without a result
                    processes[index].join(STOP_GRACE_S)
                    code = processes[index].exitcode
                    results[index] = Isolated(error=prefix + exit_reason(code), killed=code == -signal.SIGKILL)
                    continue
                if kind == "progress":
                    if on_progress is not None and index == 0:  # rank 0 speaks for the group
                        on_progress(payload)
                elif kind == "result":
                    processes[index].join(STOP_GRACE_S)  # let it exit on its own: it may still be freeing memory
                    results[index] = Isolated(value=payload)
                else:
                    results[index] = Isolated(error=prefix + payload)
            failed = next((r for r in results.values() if r.error is not None), None)
            if failed is not None:
                stopped = Isolated(error=f"stopped: {failed.error}", killed=failed.killed)
                return [results.get(i) or stopped for i in range(len(arguments))]
        return [results[i] for i in range(len(arguments))]
    finally:
        for receiver in receivers:
            receiver.close()
        for process in processes:
            _stop(process)
