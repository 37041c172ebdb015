"""Benchmark: `optprof predict` on Llama-2-7B, and the paper's Table 2 setting predicted.

Run on demand (`make bench`); prints figures and whether the target holds. Target (issue #6, 2 cores):
Llama-2-7B, 2 optimizers, one micro-batch, within 60 s. Then, for the record, FSDP on 2 ranks of 80 GiB
(the Adam-mini paper's Table 2: AdamW fits micro-batch 1 per GPU, Adam-mini 4, TinyLlama codebase).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from optprof.commands.predict import run_predict
from optprof.config import DEFAULT_CUDA_RESERVE_BYTES, Checkpointing, ModelSelection, PredictConfig, TrainingSettings
from optprof.quiet import quiet_libraries

TARGET_S = 60.0
GIB = 2**30


def cli_seconds(argv: list[str]) -> tuple[float, int]:
    optprof = str(Path(sys.executable).with_name("optprof"))
    start = time.perf_counter()
    code = subprocess.run([optprof, *argv], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
    return time.perf_counter() - start, code


def main() -> int:
    quiet_libraries()
    seconds, code = cli_seconds(["predict", "llama-2-7b", "-o", "adamw,adam-mini", "--amp", "bf16"])
    meets = seconds <= TARGET_S and code == 0
    print(f"`optprof predict llama-2-7b -o adamw,adam-mini --amp bf16` (one micro-batch, seq 2048): {seconds:.1f} s, "
          f"exit {code}{'' if meets else '  TARGET MISSED (60 s)'}")

    for checkpointing in (False, True):
        training = TrainingSettings(device="cuda", seq_len=2048, micro_batch=1, amp="bf16",
                                    checkpointing=Checkpointing.FULL if checkpointing else Checkpointing.NONE)
        config = PredictConfig(ModelSelection("llama-2-7b"), ("adamw", "adam-mini"), training,
                               gpu_memory_bytes=80 * GIB, reserve_bytes=DEFAULT_CUDA_RESERVE_BYTES, gpus=2)
        started = time.perf_counter()
        report = run_predict(config)
        print(f"Llama-2-7B, FSDP on 2 x 80 GiB, seq 2048, bf16 autocast, reserve 2 GiB, gradient checkpointing "
              f"{'on' if checkpointing else 'off'} ({time.perf_counter() - started:.1f} s):")
        for row in report.results:
            parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in row.predicted_breakdown.items())
            print(f"  {row.optimizer}: per-rank peak at micro-batch 1 {row.predicted_peak_bytes / GIB:.2f} GiB "
                  f"({parts}); predicted max micro-batch {row.predicted_max_micro_batch} ({row.trials} fake steps)")
    print("  paper, Table 2 (2 x A800-80GB, TinyLlama codebase): AdamW 1 (2 is out of memory), Adam-mini 4")
    return 0 if meets else 1


if __name__ == "__main__":
    sys.exit(main())
