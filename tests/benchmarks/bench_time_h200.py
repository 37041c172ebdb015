"""Benchmark: the time model against a real H200 step, from measurements saved by `scripts/gpu_check.sh`.

tests/benchmarks/data/h200-tinyllama.json holds what compare and torch.profiler measured on the H200
(tinyllama-1.1b, bf16 autocast, micro-batch 4 x 2048). This predicts the same step for `--gpu h200` on this
machine and prints, per optimizer, predicted against measured step and phases, then, for AdamW, the device time
per aten op (torch.profiler's self time) against the predicted op costs summed by op name. A check, never a fit:
nothing here changes the catalog.
"""

from __future__ import annotations

import collections
import json
import sys
from pathlib import Path

from optprof.commands.predict import run_predict, time_target
from optprof.config import ModelSelection, PredictConfig, TrainingSettings
from optprof.device.timeline import catalog_coster
from optprof.quiet import quiet_libraries

DATA = Path(__file__).with_name("data") / "h200-tinyllama.json"


def main() -> int:
    quiet_libraries()
    measured = json.loads(DATA.read_text())
    training = TrainingSettings(device="cuda", seq_len=measured["seq_len"], micro_batch=measured["micro_batch"],
                                amp="bf16")
    optimizers = tuple(row["optimizer"] for row in measured["compare"])
    config = PredictConfig(ModelSelection(measured["model"]), optimizers, training, gpu="h200")
    report = run_predict(config)
    print(f"{measured['model']} on {measured['device']} ({measured['source']}), micro-batch "
          f"{measured['micro_batch']} x {measured['seq_len']}, bf16 autocast: step ms, measured -> predicted")
    for row, real in zip(report.results, measured["compare"], strict=True):
        phases = row.predicted_phase_s
        print(f"  {row.optimizer}: {real['step_s_p50'] * 1e3:.1f} -> {row.predicted_step_s * 1e3:.1f} "
              f"({row.predicted_step_s / real['step_s_p50'] - 1:+.1%}); forward {real['forward_s'] * 1e3:.1f} -> "
              f"{phases['forward'] * 1e3:.1f}, backward {real['backward_s'] * 1e3:.1f} -> "
              f"{phases['backward'] * 1e3:.1f}, optimizer {real['optimizer_s'] * 1e3:.1f} -> "
              f"{phases['optimizer'] * 1e3:.1f}")
    # per op: trace the AdamW step once more and cost each op
    from optprof.commands.fake_step import FakeTrainer, fake_run
    from optprof.optimizers.registry import resolve_optimizers

    single = PredictConfig(ModelSelection(measured["model"]), ("adamw",), training, gpu="h200", alloc_conf="")
    cost = catalog_coster(time_target(single))
    with fake_run(single, training) as _:
        trainer = FakeTrainer(single, resolve_optimizers(["adamw"])[0], training)
        ops = trainer.trace(training.micro_batch).ops
    predicted: dict[str, float] = collections.defaultdict(float)
    for op in ops:
        predicted[op.name.split(".")[1] if op.name.startswith("aten.") else op.name] += cost(op)
    real_ops: dict[str, float] = collections.defaultdict(float)
    for op in measured["adamw_ops"]:
        real_ops[op["name"].split("::")[1]] += op["self_device_s"]
    names = sorted(set(predicted) | set(real_ops), key=lambda n: -(predicted.get(n, 0) + real_ops.get(n, 0)))
    print("  adamw, device ms per aten op: measured (torch.profiler) / predicted")
    for name in names[:20]:
        print(f"    {name:55s} {real_ops.get(name, 0) * 1e3:8.2f} {predicted.get(name, 0) * 1e3:8.2f}")
    print(f"    {'all ops':55s} {sum(real_ops.values()) * 1e3:8.2f} {sum(predicted.values()) * 1e3:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
