"""The architecture sweep as a table (issue #18): every decoder family of tests/architectures.py through
state-size, predict and compare with the default optimizers, on tiny configs, on CPU.

Run on demand: `.venv/bin/python tests/benchmarks/bench_architectures.py` (about 4 minutes on 2 cores).
Prints one Markdown row per family: each command's statuses (`ok` counts, and any other status with its
optimizers), the largest predicted-vs-measured error of the tensor peak, and the routing compare saw.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the sweep's helpers

from support.architectures import FAMILIES, sweep

from optprof.optimizers.registry import DEFAULT_OPTIMIZERS
from optprof.quiet import quiet_libraries

COMMANDS = ("state-size", "predict", "compare")


def _cell(statuses: dict[tuple[str, str], tuple[str, str | None]], command: str) -> str:
    rows = {optimizer: status for (cmd, optimizer), (status, _) in statuses.items() if cmd == command}
    ok = sum(status == "ok" for status in rows.values())
    others = [f"{optimizer} {status}" for optimizer, status in rows.items() if status != "ok"]
    return f"{ok}/{len(rows)} ok" + (f" ({', '.join(others)})" if others else "")


def main() -> None:
    quiet_libraries()
    print("| family | state-size | predict | compare | max abs(predicted/measured - 1) | expert load seen | s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    worst = 0.0
    with tempfile.TemporaryDirectory() as folder:
        for family in FAMILIES:
            started = time.perf_counter()
            result = sweep(family, Path(folder), DEFAULT_OPTIMIZERS)
            error = max((abs(e) for e in result.prediction_error.values()), default=None)
            worst = max(worst, error or 0.0)
            loads = [load for load in result.expert_load.values() if load is not None]
            load = f"{min(loads):.2f}-{max(loads):.2f}x" if loads else "-"
            cells = " | ".join(_cell(result.statuses, command) for command in COMMANDS)
            print(f"| {family} | {cells} | {'-' if error is None else f'{100 * error:.3f}%'} | {load} | "
                  f"{time.perf_counter() - started:.1f} |", flush=True)
    print(f"\nworst prediction error over all families and optimizers: {100 * worst:.3f}% (target 2%)")


if __name__ == "__main__":
    main()
