"""`optprof plan` end to end on a tiny model: every setup considered, one chosen per optimizer and confirmed by the
full predict, the report round-trips through `optprof report`, the plot is drawn, bad input is one line."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from support.cli import interrupt_second_call, run

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


def test_an_interrupted_plan_keeps_the_setups_searched_and_exits_130(
        model_dir: Callable[[str], str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from optprof.commands import plan

    interrupt_second_call(monkeypatch, plan, "evaluate")  # Ctrl-C while the second setup is traced
    out = tmp_path / "plan.json"
    code, _, err = run(["plan", model_dir("tiny-llama"), "--gpu", "h100-sxm", "-o", "adamw", "--seq-len", "16",
                        "--activation-checkpointing", "none,full", "--loss", "default", "--max-micro-batch", "8",
                        "--jobs", "1", "-f", "json", "--output", str(out)], capsys)
    assert code == 130 and "interrupted by SIGINT" in err, err
    report = read_report(out)
    assert isinstance(report, PlanReport) and report.interrupted == "SIGINT"
    assert sorted(str(row.status) for row in report.results) == ["interrupted", "ok"]
    chosen = report.chosen()["adamw"]  # the one setup searched is ranked, and not confirmed: the user asked to stop
    assert chosen.status == "ok" and not chosen.confirmed
    assert report.search["traced"] == 1
    code, shown, _ = run(["report", str(out)], capsys)
    assert code == 0 and "stopped the search before this setup was traced" in shown


def test_a_step_that_fits_only_micro_batch_1_is_traced_there(model_dir: Callable[[str], str], tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """A card between the steps at micro-batches 1 and 2 (a large vocabulary's logits): AdamW fits 1 alone, SGD (no
    state) fits 2; micro-batch 1, a step of its own, is traced once for every setup that needs it, and the full
    predict agrees."""
    config = json.loads((Path(model_dir("tiny-llama")) / "config.json").read_text())
    folder = tmp_path / "wide-vocabulary"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**config, "vocab_size": 128_000}))
    reserve = 794_820_608  # outside the allocator on an h100-sxm (context, NCCL): the card less this is usable
    out = tmp_path / "plan.json"
    code, _, err = run(["plan", str(folder), "--gpu", "h100-sxm", "-o", "adamw,sgd", "--seq-len", "64",
                        "--activation-checkpointing", "none,full", "--loss", "default", "--max-micro-batch", "4",
                        "--gpu-memory", str(reserve + 330_000_000), "-f", "json", "--output", str(out)], capsys)
    assert code == 0, err
    report = read_report(out)
    assert isinstance(report, PlanReport) and report.config["reserve_bytes"] == reserve
    assert {(row.optimizer, row.max_micro_batch) for row in report.results} == {("adamw", 1), ("sgd", 2)}
    assert all(row.confirmed["differences"] == ["none (within 0.5%)"] for row in report.chosen().values())


def test_a_strategy_whose_least_memory_setup_does_not_fit_is_pruned(model_dir: Callable[[str], str],
                                                                     tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """A card above what the sharded parameters, gradients and state hold (no bound prunes) but below the step of
    full checkpointing at micro-batch 1: those setups (one per loss) are traced, and the strategy's setups without
    checkpointing are pruned by them, each by its loss's, untraced (each setup its own piece of work here),
    saying why."""
    monkeypatch.setattr("optprof.commands.plan.SHARED_SETUPS", 1)
    config = json.loads((Path(model_dir("tiny-llama")) / "config.json").read_text())
    folder = tmp_path / "wide-vocabulary"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**config, "vocab_size": 128_000}))
    out = tmp_path / "plan.json"
    # 1_264_582_656 B outside the allocator on 2 h100-sxm; the state bound needs 35-65 MB more, the step 80-240 MB
    code, _, err = run(["plan", str(folder), "--gpu", "h100-sxm", "--gpus", "2", "--strategy", "fsdp", "-o", "adamw",
                        "--seq-len", "64", "--activation-checkpointing", "none,full", "--loss", "default,chunked:8",
                        "--max-micro-batch", "4", "--no-confirm", "--jobs", "1", "--gpu-memory", "1360000000",
                        "-f", "json", "--output", str(out)], capsys)
    assert code == 0, err
    report = read_report(out)
    assert isinstance(report, PlanReport)
    assert (report.search["considered"], report.search["pruned"], report.search["traced"]) == (4, 2, 2)
    least = [row for row in report.results if "AC full" in row.setup]
    assert [row.reason for row in least] == ["does not fit at micro-batch 1"] * 2
    for row in report.results:
        if row not in least:
            assert row.status == "does not fit" and row.pruned and row.reason == \
                f"fsdp, AC full, loss {row.loss}, the least memory of this strategy and loss, does not fit"


def test_setups_of_a_strategy_share_their_shallow_copies(model_dir: Callable[[str], str], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """A model deep enough for layer-periodic copies: the setups of one strategy are traced on copies built and
    warmed up once (`shallow_step.layer_periodic_setups`), and each chosen setup agrees with its full predict."""
    config = json.loads((Path(model_dir("tiny-llama")) / "config.json").read_text())
    folder = tmp_path / "deep"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 8}))
    out = tmp_path / "plan.json"
    code, _, err = run(["plan", str(folder), "--gpu", "h100-sxm", "-o", "adamw", "--seq-len", "16",
                        "--activation-checkpointing", "none,selective-op,full",
                        "--loss", "default", "--max-micro-batch", "8", "--jobs", "1", "-f", "json", "--output",
                        str(out)], capsys)
    assert code == 0, err
    report = read_report(out)
    assert isinstance(report, PlanReport) and report.search["traced"] == 3
    assert all(row.status == "ok" and (row.trace_method or "").startswith("layer-periodic") for row in report.results)
    assert report.chosen()["adamw"].confirmed["differences"] == ["none (within 0.5%)"]
