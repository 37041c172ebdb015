"""`optprof plan` end to end on a tiny model: every setup considered, one chosen per optimizer and confirmed by the
full predict, the report round-trips through `optprof report`, the plot is drawn, bad input is one line."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from support.cli import run

from optprof.results.io import read_report
from optprof.results.reports import PlanReport


def test_plan_chooses_confirms_and_round_trips(model_dir: Callable[[str], str], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    out, picture = tmp_path / "plan.json", tmp_path / "plan.png"
    code, _, err = run(["plan", model_dir("tiny-llama"), "--gpu", "h100-sxm", "--gpus", "2", "-o", "adamw,sgd",
                        "--seq-len", "16", "--strategy", "fsdp", "--activation-checkpointing", "none,full",
                        "--loss", "default", "--max-micro-batch", "64", "-f", "json", "--output", str(out),
                        "--plot", str(picture)], capsys)
    assert code == 0, err
    report = read_report(out)
    assert isinstance(report, PlanReport)
    assert report.search["considered"] == 4 and report.search["setups"] == 2
    chosen = report.chosen()
    assert set(chosen) == {"adamw", "sgd"}
    for row in chosen.values():
        assert row.command is not None and row.command.startswith("optprof predict ")
        assert f"--micro-batch {row.micro_batch}" in row.command
        # the plan's figures (micro-batch extrapolated from the traces at 2 and 3) against the full predict
        assert row.confirmed["differences"] == ["none (within 0.5%)"], row.confirmed
        assert row.predicted_tokens_per_s_per_gpu and row.predicted_mfu
    # the losers say why: slower by how much
    others = [r for r in report.results if r.choice != "chosen"]
    assert others and all(r.slower_by is not None and r.slower_by >= 0 for r in others if r.status == "ok")
    assert picture.stat().st_size > 10_000
    code, shown, _ = run(["report", str(out)], capsys)
    assert code == 0 and "PLAN (predicted)" in shown and "chosen" in shown
    assert json.loads(out.read_text())["schema"] == "optprof.plan"


@pytest.mark.parametrize(("argv", "says"), [
    (["--global-batch", "1000"], "not a whole number"),
    (["--global-batch", "lots"], "cannot read 'lots' as a token count"),
    (["--strategy", "ddp"], "plan searches fsdp"),
    (["--device", "cpu"], "--device cuda"),
])
def test_bad_plan_input_is_one_line(argv: list[str], says: str, model_dir: Callable[[str], str],
                                    capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["plan", model_dir("tiny-llama"), "--gpus", "2", "-o", "adamw", "--seq-len", "16",
                        "--strategy", "fsdp", "--activation-checkpointing", "none", "--loss", "default",
                        "--no-confirm", *argv], capsys)
    assert code == 2 and says in err and "Traceback" not in err, err
