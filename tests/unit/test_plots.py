"""Pictures (issue 16): --plot PNGs and the self-contained HTML report, on CPU runs of the demo model."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.cli import run
from support.png import decoded


def test_state_size_plot(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "state.png"
    code, _, err = run(["state-size", "demo", "-o", "adamw,adam-mini,sgd,lion", "--plot", str(path)], capsys)
    assert code == 0 and f"wrote plot {path}" in err
    height, width = decoded(path.read_bytes())
    assert width >= 1000 and height >= 300


def test_predict_plot_has_memory_and_micro_batch_panels(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from optprof.render.plots import panels_for
    from optprof.results.io import read_report

    path, saved = tmp_path / "predict.png", tmp_path / "predict.json"
    code, _, _ = run(["predict", "demo", "--device", "cpu", "--seq-len", "64", "--gpu-memory", "400MB", "-o",
                      "adamw,sgd", "--plot", str(path), "-f", "json", "--output", str(saved)], capsys)
    assert code == 0
    assert [panel.__name__ for panel in panels_for(read_report(saved))] == ["_predicted_memory_panel",
                                                                            "_predicted_micro_batch_panel"]
    height, _ = decoded(path.read_bytes())
    assert height >= 2 * 300  # two panels


def test_html_to_stdout_and_a_report_without_figures(capsys) -> None:  # type: ignore[no-untyped-def]
    code, out, _ = run(["optimizers", "-f", "html"], capsys)
    assert code == 0 and out.startswith("<!DOCTYPE html>") and "adamw" in out and "data:image/png" not in out


@pytest.mark.parametrize("suffix", ["html", "json", "csv"])
def test_the_output_suffix_picks_the_format(suffix: str, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / f"state.{suffix}"
    code, _, _ = run(["state-size", "demo", "-o", "sgd", "--output", str(path)], capsys)
    assert code == 0 and path.stat().st_size > 0


def test_memory_snapshots_are_refused_without_cuda_and_named_safely(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from optprof.measure.snapshot import snapshot_path

    code, _, err = run(["compare", "demo", "--device", "cpu", "-o", "sgd", "--memory-snapshot", str(tmp_path)],
                       capsys)
    assert code == 2 and "no CUDA allocator on --device cpu" in err
    assert snapshot_path(None, "adamw") is None
    assert snapshot_path("d", "my.pkg:Opt", 1) == Path("d") / "my.pkg_Opt-rank1.pickle"
