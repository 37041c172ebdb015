"""Functions for processes.isolated.run_isolated to run in a spawned child; this module imports nothing heavy."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable


def double_with_progress(value: int, progress: Callable[[str], None]) -> int:
    progress("halfway")
    return 2 * value


def raise_value_error(value: object, progress: Callable[[str], None]) -> None:
    raise ValueError("bad input on purpose")


def kill_self(value: object, progress: Callable[[str], None]) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def sleep_forever(value: object, progress: Callable[[str], None]) -> None:
    while True:
        time.sleep(1)
