"""Benchmark: `optprof state-size` wall time and peak RSS, and `optprof --help` start-up.

Run on demand (`make bench`); prints figures and whether each target holds. Targets (issue #2, 2 cores):
Llama-2-7B over every optimizer available here within 10 s and 1.5 GB peak RSS; Llama-2-70B within 30 s;
`optprof --help` within 1 s. Issue 14, as ratios to `import torch, transformers` timed in the same run: 7B over
every optimizer within 2.0x, 70B no slower than 7B + 20%, and each with `--full-model` (the whole model
stepped, no extrapolation from copies of the first layers) for the before/after.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

# Each command runs under a wrapper whose only child it is, so ru_maxrss is that command's peak RSS.
WRAPPER = (
    "import resource, subprocess, sys, time\n"
    "start = time.perf_counter()\n"
    "code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode\n"
    "wall = time.perf_counter() - start\n"
    "print(wall, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, code)\n"
)


def measure(argv: list[str], repeats: int = 3) -> tuple[float, int, int]:
    """Best wall time (s), the largest peak RSS (bytes) and the last exit code over `repeats` runs."""
    walls, peaks, code = [], [], 0
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", WRAPPER, *argv], capture_output=True, text=True, check=True)
        wall, peak, code_text = out.stdout.split()
        walls.append(float(wall))
        peaks.append(int(peak))
        code = int(code_text)
    return min(walls), max(peaks), code


def available_optimizers() -> list[str]:
    listing = subprocess.run([optprof(), "optimizers", "-f", "json"], capture_output=True, text=True, check=True)
    return [o["name"] for o in json.loads(listing.stdout)["optimizers"] if o["available"]]


def optprof() -> str:
    """The console script installed beside this interpreter (the project's .venv)."""
    return str(Path(sys.executable).with_name("optprof"))


def main() -> int:
    names = available_optimizers()
    cases = [
        ("--help", [optprof(), "--help"], 1.0, None),
        (f"state-size Llama-2-7B, {len(names)} optimizers", [optprof(), "state-size", "meta-llama/Llama-2-7b",
                                                             "-o", ",".join(names)], 10.0, 1.5e9),
        (f"state-size Llama-2-70B, {len(names)} optimizers", [optprof(), "state-size", "llama-2-70b",
                                                              "-o", ",".join(names)], 30.0, None),
        ("state-size Llama-2-7B, default optimizers", [optprof(), "state-size", "meta-llama/Llama-2-7b"], None, None),
    ]
    print(f"cores: {os.cpu_count()}; optimizers available here: {', '.join(names)}")
    print(f"{'case':48s} {'wall s':>8s} {'peak RSS GB':>12s}  target")
    cases += [(f"{label} --full-model", [*argv, "--full-model"], None, None)
              for label, argv, _, _ in cases[1:3]]
    imported, _, _ = measure([sys.executable, "-c", "import torch, transformers"])
    print(f"{'import torch, transformers':48s} {imported:8.2f} {'':12s}  the unit of the ratios")
    missed = 0
    walls: dict[str, float] = {}
    for label, argv, wall_target, rss_target in cases:
        wall, peak, code = measure(argv, repeats=1 if "70B" in label else 3)
        walls[label] = wall
        verdicts = [f"{wall / imported:.1f}x the import"] if label != "--help" else []
        if label == cases[1][0]:
            verdicts.append(f"<= 2.0x: {'ok' if wall <= 2.0 * imported else 'MISSED'}")
            missed += wall > 2.0 * imported
        if label == cases[2][0]:
            seven = walls[cases[1][0]]
            verdicts.append(f"<= 7B + 20%: {'ok' if wall <= 1.2 * seven else 'MISSED'}")
            missed += wall > 1.2 * seven
        if wall_target is not None:
            verdicts.append(f"wall <= {wall_target:g} s: {'ok' if wall <= wall_target else 'MISSED'}")
            missed += wall > wall_target
        if rss_target is not None:
            verdicts.append(f"RSS <= {rss_target / 1e9:g} GB: {'ok' if peak <= rss_target else 'MISSED'}")
            missed += peak > rss_target
        if code != 0:
            verdicts.append(f"exit code {code}")
            missed += 1
        print(f"{label:48s} {wall:8.2f} {peak / 1e9:12.3f}  {'; '.join(verdicts) or '-'}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
