"""Benchmark: `optprof compare` on CPU. The sampler's cost, repeatability, and the main job's wall time.

Run on demand (`make bench`); prints figures and whether each target holds. Targets (issue #3, 2 cores):
- the memory sampler costs under 1% of tokens/s. Measured in one process on one model: blocks of steps
  with the sampler running alternate with blocks without it, so drift and noise hit both alike;
- repeatability: three `compare` runs (fresh processes), coefficient of variation of tokens/s, reported;
- `optprof compare` with no arguments (the demo model, default optimizers) finishes in about 2 minutes;
- the repeated optimizer step orders sgd < momentum < adamw (the work each does), resolved by its intervals;
- refusals are immediate: an uncached hub id offline, and `--gpus 2` without CUDA, each under 10 s.
"""

from __future__ import annotations

import itertools
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from optprof.commands.compare import run_compare
from optprof.config import CompareConfig, ModelSelection, TrainingSettings
from optprof.measure.device import CpuDevice
from optprof.measure.sampler import MemorySampler
from optprof.measure.trial import TrialSpec, build_step
from optprof.optimizers.registry import REGISTRY
from optprof.quiet import quiet_libraries

SEQ_LEN = 512  # compare's CPU default for the demo model
BLOCKS = 12  # sampler-on and sampler-off blocks, each
STEPS_PER_BLOCK = 5
MAIN_JOB_TARGET_S = 120.0
SAMPLER_TARGET = 0.01
REFUSAL_TARGET_S = 10.0  # a mistake is reported at once: no network retries, no model built
ORDER = ("sgd", "momentum", "adamw")  # by the work of their step: a sum, plus a buffer, plus two moments


def sampler_overhead(interval_s: float) -> tuple[float, float, float, int]:
    """(tokens/s without, tokens/s with, relative cost, samples taken) for demo + AdamW."""
    device = CpuDevice()
    spec = TrialSpec(ModelSelection("demo"), "adamw", TrainingSettings(device="cpu", seq_len=SEQ_LEN))
    step, _ = build_step(spec, REGISTRY["adamw"], device)
    for _ in range(3):
        step.run()
    with_sampler: list[float] = []
    without: list[float] = []
    samples = 0
    for block in range(2 * BLOCKS):
        sampling = block % 2 == 0
        sampler = MemorySampler(interval_s) if sampling else None
        if sampler is not None:
            sampler.__enter__()
        times = [step.run().total_s for _ in range(STEPS_PER_BLOCK)]
        if sampler is not None:
            sampler.__exit__(None, None, None)
            samples += sampler.result.samples if sampler.result else 0
        (with_sampler if sampling else without).extend(times)
    off = SEQ_LEN / statistics.median(without)
    on = SEQ_LEN / statistics.median(with_sampler)
    return off, on, (off - on) / off, samples


def repeatability(runs: int = 3) -> dict[str, list[float]]:
    tokens: dict[str, list[float]] = {}
    config = CompareConfig(ModelSelection("demo"), ("adamw", "sgd"), TrainingSettings(device="cpu", seq_len=SEQ_LEN))
    for _ in range(runs):
        for row in run_compare(config).results:
            tokens.setdefault(row.optimizer, []).append(row.tokens_per_s or 0.0)
    return tokens


def main_job_seconds() -> tuple[float, int]:
    optprof = str(Path(sys.executable).with_name("optprof"))
    start = time.perf_counter()
    code = subprocess.run([optprof, "compare"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
    return time.perf_counter() - start, code


def step_order() -> dict[str, tuple[float, tuple[float, float]]]:
    """optimizer -> (median optimizer step s, its 95% interval) on demo at compare's CPU default."""
    config = CompareConfig(ModelSelection("demo"), ORDER, TrainingSettings(device="cpu", seq_len=SEQ_LEN))
    return {row.optimizer: (row.optimizer_step_s or 0.0, row.optimizer_step_s_ci95 or (0.0, 0.0))
            for row in run_compare(config).results}


def refusal_seconds(argv: list[str]) -> tuple[float, int]:
    """How long a command the user got wrong takes to say so, and its exit code."""
    optprof = str(Path(sys.executable).with_name("optprof"))
    start = time.perf_counter()
    code = subprocess.run([optprof, *argv], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}).returncode
    return time.perf_counter() - start, code


def main() -> int:
    quiet_libraries()
    ok = True
    print(f"sampler overhead, demo + adamw, seq {SEQ_LEN}, {BLOCKS} x {STEPS_PER_BLOCK} steps each way:")
    for interval in (0.02, 0.001):
        off, on, cost, samples = sampler_overhead(interval)
        meets = interval != 0.02 or cost < SAMPLER_TARGET
        ok &= meets
        label = "default" if interval == 0.02 else "stress"
        print(f"  interval {1000 * interval:g} ms ({label}): {off:,.0f} tokens/s without, {on:,.0f} with, "
              f"cost {100 * cost:+.2f}% ({samples} samples){'' if meets else '  TARGET MISSED (< 1%)'}")

    print("repeatability, 3 runs of compare demo -o adamw,sgd (fresh processes):")
    for name, values in repeatability().items():
        cv = statistics.stdev(values) / statistics.fmean(values)
        print(f"  {name}: tokens/s {', '.join(f'{v:,.0f}' for v in values)}; CV {100 * cv:.1f}%")

    steps = step_order()
    ordered = all(steps[a][1][1] < steps[b][1][0] for a, b in itertools.pairwise(ORDER))
    ok &= ordered
    print("optimizer step (repeated on one set of gradients), median [95% interval] ms: " + ", ".join(
        f"{name} {1000 * s:.2f} [{1000 * lo:.2f}, {1000 * hi:.2f}]" for name, (s, (lo, hi)) in steps.items())
        + ("" if ordered else "  ORDER NOT RESOLVED (sgd < momentum < adamw)"))
    for label, argv in (("uncached hub id, offline", ["state-size", "someone/not-a-model-anywhere"]),
                        ("--gpus 2 without CUDA", ["compare", "meta-llama/Llama-2-7b", "--gpus", "2"])):
        seconds, code = refusal_seconds(argv)
        meets = seconds < REFUSAL_TARGET_S and code == 2
        ok &= meets
        print(f"refusal, {label}: {seconds:.1f} s, exit {code}{'' if meets else '  TARGET MISSED (< 10 s, exit 2)'}")

    seconds, code = main_job_seconds()
    meets = seconds <= MAIN_JOB_TARGET_S and code == 0
    ok &= meets
    print(f"`optprof compare` (demo, default optimizers): {seconds:.1f} s, exit {code}"
          f"{'' if meets else '  TARGET MISSED (about 2 minutes)'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
