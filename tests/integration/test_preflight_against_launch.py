"""preflight's fit decision against compare: a step far over the memory is a row, and no trial is launched."""

from __future__ import annotations

from optprof.commands.compare import TrialRunner, run_compare
from optprof.config import CompareConfig, ModelSelection, TrainingSettings


def test_a_step_far_over_the_memory_is_a_row_without_a_launch(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    launched: list[str] = []
    original = TrialRunner.run

    def counted(self, entry, *args, **kwargs):  # type: ignore[no-untyped-def]
        launched.append(entry.name)
        return original(self, entry, *args, **kwargs)

    monkeypatch.setattr(TrialRunner, "run", counted)
    limited = TrainingSettings(device="cpu", seq_len=32, steps=1, memory_limit_bytes=20 * 10**6)  # 20 MB
    config = CompareConfig(ModelSelection("demo"), ("adamw",), limited)
    (row,) = run_compare(config, isolate=False).results
    assert row.status == "does not fit" and not launched, row.reason
    assert row.memory_limit_bytes == 20 * 10**6 and row.predicted_peak_bytes > 1.1 * 20 * 10**6
    assert row.short_by_bytes == row.predicted_peak_bytes - 20 * 10**6
    assert "no trial was launched" in row.reason
    (row,) = run_compare(CompareConfig(ModelSelection("demo"), ("adamw",), limited, preflight=False),
                         isolate=False).results
    assert launched == ["adamw"] and row.status == "ok"  # on a CPU a fixed micro-batch is not held to the limit
