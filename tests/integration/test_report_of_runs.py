"""`optprof report` over saved runs of real commands: the same table again, several runs side by side."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd
import pytest
from support.cli import run

from optprof.results.reports import ModelsReport


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

    from optprof.cli.app import main

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
