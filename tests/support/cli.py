"""The console entry point as a user meets it, for every test tier."""

from __future__ import annotations

import pytest

from optprof.cli.app import main


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """main(argv): exit code, stdout, stderr."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out, err = capsys.readouterr()
    return int(exit_info.value.code or 0), out, err


def interrupt_second_call(monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> None:
    """`owner.name` as a Ctrl-C meets it: the first call runs, the second raises SIGINT's Interrupted (a command run
    in this process, `--jobs 1`, stopped part-way)."""
    import signal

    from optprof.interrupts import Interrupted

    original = getattr(owner, name)
    calls = {"n": 0}

    def second_is_interrupted(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] == 2:
            raise Interrupted(signal.SIGINT)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, second_is_interrupted)
