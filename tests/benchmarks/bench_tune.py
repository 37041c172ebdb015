"""Benchmark: the default `optprof tune` (demo model, byte tokens of the standard library, the default eight
optimizers, 8 trials of 50 steps each, 2 noise seeds). Run on demand; prints the wall time against the target
(issue #17: within 10 minutes on 2 cores) and the run's inclusion results.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_S = 600.0


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        output = Path(folder) / "tune.json"
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "optprof", "tune", "--output", str(output)], check=True,
                       stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - started
        report = json.loads(output.read_text())
    print(f"optprof tune (defaults) on {os.cpu_count()} cores: {wall:.1f} s; target {TARGET_S:.0f} s: "
          f"{'met' if wall <= TARGET_S else 'MISSED'}")
    for row in report["results"]:
        print(f"  {row['optimizer']:>10}: best held-out loss {row['best_val_loss']:.3f}, seed range "
              f"{row['noise_range']:.3f}, diverged {row['diverged_fraction']:.0%}")
    for check in report["inclusion"]:
        print(f"  {check['special']} ⊆ {check['general']}: gap {check['gap']:+.3f}, margin {check['margin']:.3f}, "
              f"holds {check['holds']}")


if __name__ == "__main__":
    main()
