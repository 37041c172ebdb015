"""Benchmark: the memory model against real H200 steps, from measurements saved by `scripts/gpu_check.sh`.

tests/benchmarks/data/h200-memory.json holds what compare measured on an H200 (tinyllama-1.1b, AdamW) for torch's
three update paths (for-loop, foreach, fused), four allocator settings (PYTORCH_CUDA_ALLOC_CONF) and two recipes.
This predicts each run on this machine with the same flags and setting (`predict --gpu h200`) and prints predicted
against measured peak allocated, peak reserved and the process's device memory (NVML). A check, never a fit.
Usage: python tests/benchmarks/bench_memory_h200.py  (about 2 minutes on 2 cores)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

DATA = Path(__file__).with_name("data") / "h200-memory.json"
GB = 1e9


def predicted(model: str, optimizer: str, args: list[str], alloc_conf: str) -> dict:
    env = {**os.environ, "PYTORCH_CUDA_ALLOC_CONF": alloc_conf}
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "predict.json"
        subprocess.run([sys.executable, "-m", "optprof", "predict", model, "-o", optimizer, "--device", "cuda",
                        "--gpu", "h200", *args, "-f", "json", "--output", str(out)],
                       env=env, check=True, capture_output=True)
        return json.loads(out.read_text())["results"][0]


def main() -> int:
    data = json.loads(DATA.read_text())
    print(f"{data['model']}, {data['optimizer']} on {data['gpu']}\n({data['source']})")
    print(f"{'run':<30} {'allocated GB':>22} {'reserved GB':>22} {'device (NVML) GB':>22}")
    for run in data["runs"]:
        row, real = predicted(data["model"], data["optimizer"], run["args"], run["alloc_conf"]), run["measured"]
        cells = []
        for ours, theirs in (("predicted_allocated_bytes", "torch_max_allocated_bytes"),
                             ("predicted_reserved_bytes", "torch_max_reserved_bytes"),
                             ("predicted_device_bytes", "nvml_process_peak_bytes")):
            cells.append(f"{real[theirs] / GB:6.3f} -> {row[ours] / GB:6.3f} {row[ours] / real[theirs] - 1:+6.2%}")
        print(f"{run['name']:<30} " + " ".join(f"{cell:>22}" for cell in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
