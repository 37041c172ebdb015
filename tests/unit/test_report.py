"""Saved reports read back into equal objects, and `optprof report` re-renders them (one run, or several)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from support.cli import run

from optprof.commands.compare import run_compare
from optprof.commands.predict import run_predict
from optprof.commands.state_size import run_state_size
from optprof.config import CompareConfig, ModelSelection, PredictConfig, StateSizeConfig, TrainingSettings
from optprof.optimizers.registry import optimizers_report
from optprof.results.io import load_report
from optprof.results.profiles import Profile, judge
from optprof.results.reports import CheckReport, ModelsReport, Report

TINY = TrainingSettings(device="cpu", seq_len=32, steps=1)


def round_trips(report: Report) -> None:
    again = type(report).from_json(report.to_json())
    assert again == report
    assert load_report(json.loads(report.to_json())) == report  # found by its schema name too
    assert again.to_json() == report.to_json()


def test_state_size_round_trips() -> None:
    round_trips(run_state_size(StateSizeConfig(ModelSelection("demo"), ("adamw", "adam-mini", "sgd"))))


def test_compare_round_trips(model_dir: Callable[[str], str]) -> None:
    config = CompareConfig(ModelSelection(model_dir("tiny-llama")), ("adamw", "sgd"), TINY)
    report = run_compare(config, isolate=False)
    assert report.results[0].breakdown and report.results[0].losses  # nested dicts and tuples are there
    round_trips(report)


def test_predict_round_trips() -> None:
    training = TrainingSettings(device="cpu", seq_len=32)
    round_trips(run_predict(PredictConfig(ModelSelection("demo"), ("adamw",), training, gpu_memory_bytes=10**9)))


def test_check_optimizers_and_models_round_trip(tmp_path: Path) -> None:
    profile = Profile(tmp_path / "p.toml", "demo", ("adamw",), expected={"adamw": {"state_bytes": 100}})
    verdicts = (judge(profile, "adamw", "state_bytes", 100, 101), judge(profile, "adamw", "state_bytes", 100, None))
    check = CheckReport(verdicts=verdicts, profiles=(str(profile.path),), strict=False, updated={})
    assert check.failed  # a regression and a missing figure
    for report in (check, optimizers_report(), ModelsReport.bundled()):
        round_trips(report)


def test_a_newer_schema_version_is_one_clear_line(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    body = json.loads(ModelsReport.bundled().to_json())
    body["schema_version"] = 99
    newer = tmp_path / "newer.json"
    newer.write_text(json.dumps(body))
    code, out, err = run(["report", str(newer)], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "schema version 99 is newer than this optprof reads (1): upgrade optprof" in err


@pytest.mark.parametrize(("text", "message"), [
    ("{ not json", "is not JSON"),
    ('{"schema": "somebody.else"}', "is not an optprof report"),
    ('{"schema": "optprof.models", "schema_version": 1}', "a damaged optprof.models report"),
    ('{"schema": "optprof.models"}', "optprof.models report without a readable schema version (None)"),
])
def test_unreadable_reports_exit_2(tmp_path: Path, text: str, message: str, capsys) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "bad.json"
    path.write_text(text)
    code, _, err = run(["report", str(path)], capsys)
    assert code == 2 and message in err and err.count("\n") == 1


def test_a_difference_the_intervals_do_not_support_is_shown_as_approximately() -> None:
    from rich.console import Console

    from optprof.measure.stats import median_ci95
    from optprof.model.loading import load_model
    from optprof.render import text as report
    from optprof.results.reports import CompareReport
    from optprof.results.rows import CompareRow

    assert median_ci95([5.0, 1, 4, 2, 3]) is None  # five values cannot give 95%
    assert median_ci95([float(v) for v in range(10, 0, -1)]) == (2.0, 9.0)  # ranks 2 and 9 of 10
    assert median_ci95([float(v) for v in range(1, 21)]) == (6.0, 15.0)  # ranks 6 and 15 of 20

    def row(name: str, tokens: tuple[float, float], step_ms: tuple[float, float], fwd_bwd: float) -> CompareRow:
        return CompareRow(name, "torch", None, "adaptive", "ok", micro_batch=1, tokens_per_s=sum(tokens) / 2,
                          tokens_per_s_ci95=tokens, optimizer_step_s=sum(step_ms) / 2000,
                          optimizer_step_s_ci95=(step_ms[0] / 1000, step_ms[1] / 1000), forward_s=fwd_bwd / 2,
                          backward_s=fwd_bwd / 2, optimizer_s=0.001)

    rows = (row("adamw", (1000, 1100), (14.0, 16.0), 0.1),
            row("overlaps", (1050, 1200), (15.5, 17.0), 0.1),  # both intervals overlap AdamW's: ≈ twice
            row("faster", (1500, 1600), (1.0, 2.0), 0.104))  # separate, and beyond the 4% drift
    compare = CompareReport(model=load_model("demo").info, results=rows, config={}, device={"name": "cpu"},
                            fwd_bwd_spread=0.04)
    console = Console(width=200, record=True)
    console.print(report.render(compare))
    lines = {line.split()[0]: line for line in console.export_text().splitlines() if line.strip()}
    assert lines["overlaps"].count("≈") == 2
    assert "+47.6%" in lines["faster"] and "0.10x" in lines["faster"] and "≈" not in lines["faster"]
    within_drift = CompareReport(model=compare.model, results=rows, config={}, device={}, fwd_bwd_spread=0.5)
    console = Console(width=200, record=True)
    console.print(report.render(within_drift))
    faster = next(line for line in console.export_text().splitlines() if line.startswith(" faster"))
    assert "≈" in faster and "0.10x" in faster  # +47.6% tokens/s is within a 50% drift; the step is not


def test_a_version_1_state_size_report_reads_back_with_its_extent_split_off() -> None:
    """Version 1 wrote the layer extent into the method's words; it reads back as the two members."""
    from optprof.commands.state_size import run_state_size
    from optprof.config import ModelSelection, StateSizeConfig
    from optprof.results.io import load_report
    from optprof.results.vocab import LayerExtent, StateMethod

    data = run_state_size(StateSizeConfig(ModelSelection("demo"), ("adamw",))).to_dict()
    old = "meta step, placeholder scalars, extrapolated from the first 1, 2 and 3 layers"
    data = {**data, "schema_version": 1, "results": [{**data["results"][0], "method": old}]}
    del data["results"][0]["layer_extent"]  # version 1 had no such field
    (read,) = load_report(data).rows()
    assert (read.method, read.layer_extent) == (StateMethod.META_PLACEHOLDERS, LayerExtent.EXTRAPOLATED)


def test_a_version_1_predict_report_reads_its_fragmentation_as_the_cached_free_bytes() -> None:
    """Version 1's predicted_fragmentation_bytes was reserved - allocated at the reserved peak; version 2 names it,
    and adds peak reserved - peak allocated."""
    from optprof.results.io import load_report

    data = json.loads((Path(__file__).parent.parent / "data" / "predict-a800.json").read_text())
    assert data["schema_version"] == 1
    old = data["results"][0]
    (row, *_) = load_report(data).rows()
    assert row.predicted_cached_free_at_reserved_peak_bytes == old["predicted_fragmentation_bytes"] == 29_104_054_784
    assert row.predicted_reserved_minus_allocated_bytes == \
        old["predicted_reserved_bytes"] - old["predicted_allocated_bytes"]
