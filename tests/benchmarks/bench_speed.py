"""Benchmark (issues 14 and 28): each command the issues name, as a ratio to `import torch, transformers` timed in
the same run. Run on demand: `.venv/bin/python tests/benchmarks/bench_speed.py` (about 3 minutes on 2 cores); for
a before/after, run it on each checkout with PYTHONPATH pointing at it, one after the other on an idle machine.

Goals: state-size of Llama-2-7B over every available optimizer <= 2.0x (and Llama-2-70B within the 7B time +
20%); `predict meta-llama/Llama-2-7b --gpus 2 --gpu-memory 80GiB -o adamw,adam-mini --amp bf16` <= 4x; `check
profiles/` <= 5x; default `compare` on demo (CPU) <= 8x. `--full-model` rows show state-size as it was before
copies of the first layers (the "before" of that lever).
"""

from __future__ import annotations

import sys
from pathlib import Path

from bench_state_size import available_optimizers, measure, optprof


def main() -> int:
    names = ",".join(available_optimizers())
    cases = [
        ("state-size 7B, every optimizer", ["state-size", "meta-llama/Llama-2-7b", "-o", names], 2.0),
        ("state-size 7B, every optimizer --full-model",
         ["state-size", "meta-llama/Llama-2-7b", "-o", names, "--full-model"], None),
        ("state-size 70B, every optimizer", ["state-size", "llama-2-70b", "-o", names], None),
        ("predict 7B --gpus 2 --gpu-memory 80GiB bf16",
         ["predict", "meta-llama/Llama-2-7b", "--gpus", "2", "--gpu-memory", "80GiB", "-o", "adamw,adam-mini",
          "--amp", "bf16"], 4.0),
        ("check profiles/", ["check", str(Path(__file__).parents[2] / "profiles")], 5.0),
        ("compare demo (default optimizers, cpu)", ["compare", "--device", "cpu"], 8.0),
    ]
    imported, _, _ = measure([sys.executable, "-c", "import torch, transformers"])
    print(f"{'command':48s} {'wall s':>8s} {'x import':>9s}  goal")
    print(f"{'import torch, transformers':48s} {imported:8.2f} {1.0:9.1f}")
    missed = 0
    for label, argv, goal in cases:
        wall, _, code = measure([optprof(), *argv], repeats=1)
        ratio = wall / imported
        verdict = "-" if goal is None else f"<= {goal:g}x: {'ok' if ratio <= goal else 'MISSED'}"
        missed += goal is not None and ratio > goal
        print(f"{label:48s} {wall:8.2f} {ratio:9.1f}  {verdict}{'' if code == 0 else f' (exit {code})'}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
