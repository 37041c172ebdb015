"""Benchmark: what the time model adds to `optprof predict` (issue 33, item 7: at most 15% of its wall time).

The same prediction twice, with and without --gpu (the same --gpu-memory, so both search the same sizes): the op
records ride on the trace predict already makes, and costing them on the timeline is the only extra work. Prints
both wall times (best of two each, since a 2-core machine is noisy) and the overhead.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

TARGET = 0.15
ARGS = ["predict", "llama-2-7b", "-o", "adamw,adam-mini", "--amp", "bf16", "--gpus", "2", "--gpu-memory", "80GiB"]


def seconds(argv: list[str]) -> float:
    optprof = str(Path(sys.executable).with_name("optprof"))
    best = float("inf")
    for _ in range(2):
        start = time.perf_counter()
        subprocess.run([optprof, *argv], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> int:
    plain = seconds(ARGS)
    timed = seconds([*ARGS, "--gpu", "h100-sxm"])
    overhead = timed / plain - 1
    print(f"`optprof {' '.join(ARGS)}`: {plain:.1f} s; with --gpu h100-sxm: {timed:.1f} s; the time model adds "
          f"{overhead:+.1%} (target at most {TARGET:.0%}){'' if overhead <= TARGET else '  TARGET MISSED'}")
    return 0 if overhead <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
