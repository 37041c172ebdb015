"""A signal in the middle of a 2-rank gloo compare: the finished optimizer's row is kept, the rest say
`interrupted`, the JSON is written, the exit code is 128 + the signal, and no process of the run is left."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

OPTIMIZERS = ("sgd", "adamw", "adam-mini")


def _first_row_done(stderr: Path) -> bool:
    lines = stderr.read_text().splitlines() if stderr.exists() else []
    return any(line.split(":")[0] in OPTIMIZERS and "tokens/s" in line for line in lines)


@pytest.mark.parametrize(("signum", "to_group"), [
    (signal.SIGINT, True),
    pytest.param(signal.SIGTERM, False, marks=pytest.mark.skipif(  # the same path, another signal: 14 s
        not os.environ.get("OPTPROF_ALL_FAMILIES"), reason="make families runs SIGTERM to the process alone")),
])
def test_a_signal_keeps_the_finished_rows_and_leaves_no_process(signum: int, to_group: bool, tmp_path: Path) -> None:
    output, stderr = tmp_path / "run.json", tmp_path / "stderr.txt"
    command = [sys.executable, "-m", "optprof", "compare", "demo", "--device", "cpu", "--gpus", "2",
               "-o", ",".join(OPTIMIZERS), "--seq-len", "32", "--steps", "2", "--no-predict", "--output", str(output)]
    with stderr.open("w") as err:
        # a session of its own: Ctrl-C reaches a terminal's whole foreground group, SIGTERM (SLURM, CI) the process
        run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.monotonic() + 240
        while not _first_row_done(stderr) and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert run.poll() is None, stderr.read_text()[-2000:]  # still running: two rows to go
        if to_group:
            os.killpg(run.pid, signum)
        else:
            run.send_signal(signum)
        code = run.wait(timeout=60)
    text = stderr.read_text()
    assert code == 128 + signum, text[-2000:]
    assert "Traceback" not in text, text[-3000:]
    rows = {row["optimizer"]: row for row in json.loads(output.read_text())["results"]}
    finished = [name for name, row in rows.items() if row["status"] == "ok"]
    assert len(finished) >= 1 and all(rows[name]["tokens_per_s"] for name in finished)
    assert {row["status"] for name, row in rows.items() if name not in finished} == {"interrupted"}
    time.sleep(0.5)
    left = subprocess.run(["pgrep", "-g", str(run.pid)], capture_output=True, text=True).stdout.split()
    assert left == [], left  # the ranks, the fork server and the resource tracker are all gone
