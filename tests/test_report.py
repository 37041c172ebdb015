"""Saved reports read back into equal objects, and `optprof report` re-renders them (one run, or several)."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from test_cli import run

from optprof.baseline import Profile, judge
from optprof.compare import run_compare
from optprof.config import CompareConfig, ModelSelection, PredictConfig, StateSizeConfig, TrainingSettings
from optprof.optimizers.registry import optimizers_report
from optprof.predict import run_predict
from optprof.results import CheckReport, ModelsReport, Report, load_report
from optprof.state_size import run_state_size

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
])
def test_unreadable_reports_exit_2(tmp_path: Path, text: str, message: str, capsys) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "bad.json"
    path.write_text(text)
    code, _, err = run(["report", str(path)], capsys)
    assert code == 2 and message in err and err.count("\n") == 1


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """Two real compare runs saved as JSON, and the table the first printed while it ran."""
    folder = tmp_path_factory.mktemp("runs")
    paths = (folder / "a.json", folder / "b.json")
    tables = []
    for path, optimizers in zip(paths, ("adamw,sgd", "sgd"), strict=True):
        argv = ["compare", "demo", "--device", "cpu", "-o", optimizers, "--seq-len", "32", "--steps", "1",
                "--output", str(path)]  # a table on stdout, JSON in the file
        tables.append(_run_quietly(argv))
    return paths[0], paths[1], tables[0]


def _run_quietly(argv: list[str]) -> str:
    import contextlib

    from optprof.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as done:
        main(argv)
    assert (done.value.code or 0) == 0, err.getvalue()
    return out.getvalue()


def test_report_prints_the_table_the_run_printed(two_runs: tuple[Path, Path, str]) -> None:
    first, _, printed = two_runs
    again = _run_quietly(["report", str(first)])
    assert "adamw" in again and "Training step, measured on" in again
    assert again == printed


def test_report_shows_several_runs_labelled_by_file(two_runs: tuple[Path, Path, str]) -> None:
    first, second, _ = two_runs
    table = _run_quietly(["report", str(first), str(second)])
    for label in ("adamw (a)", "sgd (a)", "sgd (b)"):
        assert label in table
    frame = pd.read_csv(io.StringIO(_run_quietly(["report", str(first), str(second), "-f", "csv"])))
    assert list(frame["run"]) == ["a", "a", "b"] and list(frame["optimizer"]) == ["adamw", "sgd", "sgd"]
    both = json.loads(_run_quietly(["report", str(first), str(second), "-f", "json"]))
    assert [body["schema"] for body in both] == ["optprof.compare", "optprof.compare"]


def test_report_refuses_to_mix_kinds(two_runs: tuple[Path, Path, str], tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    models = tmp_path / "models.json"
    models.write_text(ModelsReport.bundled().to_json())
    code, _, err = run(["report", str(two_runs[0]), str(models)], capsys)
    assert code == 2 and "different kinds" in err


def test_a_difference_the_intervals_do_not_support_is_shown_as_approximately() -> None:
    from rich.console import Console

    from optprof import report
    from optprof.measure.stats import median_ci95
    from optprof.models import load_model
    from optprof.results import CompareReport, CompareRow

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
