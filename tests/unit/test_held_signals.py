"""A signal during a fake step in compare's own process is held until the step ends (interrupts.held_signals)."""

from __future__ import annotations

import os
import signal

import pytest

from optprof.interrupts import Interrupted, held_signals, interruptible


def test_a_signal_is_held_until_the_block_ends_and_wins_over_its_error() -> None:
    reached = []
    with interruptible(), pytest.raises(Interrupted) as stopped, held_signals("a fake step"):
        os.kill(os.getpid(), signal.SIGTERM)
        reached.append("after the signal")  # held: the body goes on
        raise ValueError("the body's own error")
    assert reached == ["after the signal"] and stopped.value.exit_code == 143


def test_outside_interruptible_nothing_is_held() -> None:
    with held_signals("a fake step"):
        assert signal.getsignal(signal.SIGTERM) is not None
