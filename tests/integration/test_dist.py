"""`compare --gpus N`: real torch.distributed ranks on CPU (gloo), DDP and FSDP2, torchrun, rank faults."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys

import pytest
import torch
from support.cli import run
from support.processes import left_behind

from optprof.commands.compare import run_compare
from optprof.commands.state_size import run_state_size
from optprof.config import CompareConfig, ModelSelection, StateSizeConfig, TrainingSettings
from optprof.distributed.folding import fold_ranks
from optprof.results.reports import CompareReport
from optprof.results.rows import CompareRow

PAIR = ("adamw", "adam-mini", "adam-mini-paper")  # adam-mini-paper: optprof's own, DTensor-aware
TRAINING = TrainingSettings(device="cpu", seq_len=32, steps=1)


def on_two_ranks(strategy: str) -> CompareReport:
    config = CompareConfig(ModelSelection("demo"), PAIR, TRAINING, gpus=2, strategy=strategy)
    return run_compare(config)


@pytest.fixture(scope="module")
def ddp() -> CompareReport:
    return on_two_ranks("ddp")


@pytest.fixture(scope="module")
def fsdp() -> CompareReport:
    return on_two_ranks("fsdp")


def test_both_strategies_run_both_optimizers(ddp: CompareReport, fsdp: CompareReport) -> None:
    for report, strategy in ((ddp, "ddp"), (fsdp, "fsdp")):
        for row in report.results:
            assert row.status == "ok", (strategy, row.optimizer, row.reason)
            assert (row.world_size, row.strategy, len(row.ranks)) == (2, strategy, 2)
            assert row.tokens_per_s == pytest.approx(sum(r.tokens_per_s for r in row.ranks))
            assert row.peak_bytes == max(r.peak_bytes for r in row.ranks)
            assert any("gradient buckets" in note for note in row.notes) == (strategy == "ddp")


def test_fsdp_halves_each_ranks_state_and_keeps_the_logical_total(ddp: CompareReport, fsdp: CompareReport) -> None:
    single = {r.optimizer: r.state_bytes for r in run_state_size(StateSizeConfig(ModelSelection("demo"), PAIR)).results}
    for replicated, sharded in zip(ddp.results, fsdp.results, strict=True):
        for rank_ddp, rank_fsdp in zip(replicated.ranks, sharded.ranks, strict=True):
            assert rank_ddp.state_bytes == single[replicated.optimizer]  # each DDP rank holds it all
            assert rank_fsdp.state_bytes == pytest.approx(rank_ddp.state_bytes / 2, rel=0.02)
        assert replicated.state_bytes == sharded.state_bytes == single[replicated.optimizer]


def test_the_table_title_names_ranks_and_strategy(ddp: CompareReport, fsdp: CompareReport) -> None:
    for result, strategy in ((ddp, "ddp"), (fsdp, "fsdp")):
        assert f"2 ranks ({strategy})" in _title(result)


def _title(result: CompareReport) -> str:
    from rich.console import Console

    from optprof.render import text as report

    console = Console(width=200, record=True)
    console.print(report.render(result))
    return next(line for line in console.export_text().splitlines() if "Training step, measured" in line)


def test_rank_figures_round_trip(fsdp: CompareReport) -> None:
    again = CompareReport.from_json(fsdp.to_json())
    assert again == fsdp and again.results[0].ranks[1] == fsdp.results[0].ranks[1]
    assert fsdp.config["rank_fold"]["energy_j"] == "sum"  # the report says how its ranks were folded


def test_the_loss_after_one_step_is_the_same_under_ddp_and_fsdp(ddp: CompareReport, fsdp: CompareReport) -> None:
    for replicated, sharded in zip(ddp.results, fsdp.results, strict=True):
        assert replicated.losses[0] == sharded.losses[0]  # same seed: same weights, same tokens per rank
        assert replicated.losses[1] == pytest.approx(sharded.losses[1], rel=1e-5)  # after one optimizer step
        assert replicated.losses[1] != replicated.losses[0]
        # after three steps (2 warm-up, 1 timed); DDP's update is the single-device update on the global batch
        assert replicated.losses[3] == pytest.approx(sharded.losses[3], abs=1e-5), replicated.optimizer


def test_zero2_shards_state_and_gradients_like_fsdp(ddp: CompareReport) -> None:
    config = CompareConfig(ModelSelection("demo"), ("adamw",), TRAINING, gpus=2, strategy="zero2", predict=False)
    (row,) = run_compare(config).results
    replicated = ddp.results[0]
    assert row.status == "ok" and row.strategy == "zero2", row.reason
    for rank_zero2, rank_ddp in zip(row.ranks, replicated.ranks, strict=True):
        assert rank_zero2.state_bytes == pytest.approx(rank_ddp.state_bytes / 2, rel=0.01)
    assert row.breakdown["gradients"] == pytest.approx(replicated.breakdown["gradients"] / 2, rel=0.01)
    assert row.losses[3] == pytest.approx(replicated.losses[3], abs=1e-5)


def test_zero1_shards_whole_parameters_state_across_ranks(ddp: CompareReport) -> None:
    """ZeroRedundancyOptimizer: each rank the state of its own parameters, the total as on one device."""
    config = CompareConfig(ModelSelection("demo"), PAIR, TRAINING, gpus=2, strategy="zero1", predict=False)
    for row, replicated in zip(run_compare(config).results, ddp.results, strict=True):
        assert row.status == "ok" and row.strategy == "zero1", (row.optimizer, row.reason)
        per_rank = [rank.state_bytes for rank in row.ranks]
        assert sum(per_rank) == pytest.approx(replicated.ranks[0].state_bytes, rel=0.001), row.optimizer
        assert row.state_bytes == sum(per_rank) and max(per_rank) < replicated.ranks[0].state_bytes
        assert row.losses[3] == pytest.approx(replicated.losses[3], abs=1e-5), row.optimizer


def test_a_package_that_cannot_take_dtensors_is_unsupported_under_fsdp() -> None:
    """torch's Adafactor does an in-place pow on a partial DTensor: a finding about torch, not a failure. Here
    the ranks are launched (--no-preflight), so the finding comes from the real step."""
    config = CompareConfig(ModelSelection("demo"), ("adafactor",), TRAINING, gpus=2, strategy="fsdp", predict=False,
                           preflight=False)
    (row,) = run_compare(config).results
    assert row.status == "unsupported", row.reason
    assert "torch's own code cannot run on FSDP2-sharded (DTensor) parameters over 2 ranks (fsdp)" in row.reason
    assert not any("decided before launching" in note for note in row.notes)


def test_hsdp_replicates_across_shard_groups(ddp: CompareReport) -> None:
    """Two shard groups of one rank each (a 2-D mesh, 2 x 1): every rank holds the whole state, as under DDP,
    and adam-mini-paper's block sums stay within each group: the same losses as DDP's."""
    config = CompareConfig(ModelSelection("demo"), PAIR, TRAINING, gpus=2, strategy="hsdp", shard_size=1,
                           predict=False)
    report = run_compare(config)
    for row, replicated in zip(report.results, ddp.results, strict=True):
        assert row.status == "ok" and row.strategy == "hsdp", (row.optimizer, row.reason)
        assert [r.state_bytes for r in row.ranks] == [replicated.ranks[0].state_bytes] * 2, row.optimizer
        assert row.losses[3] == pytest.approx(replicated.losses[3], abs=1e-5), row.optimizer
    assert report.config["shard_size"] == 1
    assert "2 ranks (hsdp: 2 replicas x 1 shards)" in _title(report)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_several_ranks_without_cuda_need_device_cpu(capsys) -> None:  # type: ignore[no-untyped-def]
    """No silent CPU fallback: N CPU processes of a 7B model would each be killed for memory, one by one."""
    code, _, err = run(["compare", "meta-llama/Llama-2-7b", "--gpus", "2"], capsys)
    assert code == 2  # at once: bench_compare.py times the refusal
    assert err.count("\n") == 1 and "--device cpu" in err and "optprof predict MODEL --gpus 2" in err


def test_a_killed_rank_fails_its_trial_and_leaves_nothing_behind(capsys) -> None:  # type: ignore[no-untyped-def]
    argv = ["compare", "demo", "--device", "cpu", "--gpus", "2", "--seq-len", "32", "--steps", "1", "-f", "json",
            "--trial-timeout", "120", "-o", "support.optimizers:KilledOnRankOne,sgd"]
    code, out, _ = run(argv, capsys)
    assert code == 1
    killed, sgd = json.loads(out)["results"]
    assert killed["status"] == "failed" and "rank 1" in killed["reason"] and "SIGKILL" in killed["reason"]
    assert sgd["status"] == "ok" and sgd["world_size"] == 2
    assert multiprocessing.active_children() == []
    assert left_behind() == []


def test_under_torchrun_rank_zero_writes_one_report_with_predictions() -> None:
    """Every rank runs the optimizers in rank 0's order (each rank's state alike within a row), rank 0 predicts
    before the group joins, and its report is the only output."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "optprof", "compare",
               "demo", "--device", "cpu", "-o", "sgd,adamw", "--seq-len", "32", "--steps", "1", "-f", "json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    body = json.loads(done.stdout)  # exactly one JSON document: rank 1 printed nothing
    assert body["config"]["torchrun"] is True
    for row in body["results"]:
        assert (row["status"], row["world_size"], row["strategy"], len(row["ranks"])) == ("ok", 2, "fsdp", 2)
        assert len({rank["state_bytes"] for rank in row["ranks"]}) == 1, row["optimizer"]  # one optimizer per row
        assert abs(row["prediction_errors"]["tensor_peak_bytes"]) <= 0.02, row["optimizer"]


def test_ranks_stop_repeating_the_optimizer_step_together() -> None:
    """The repeated optimizer step decides when to stop across ranks: a step that holds a collective would
    otherwise leave the rank that stops late waiting for one that already left."""
    config = CompareConfig(ModelSelection("demo"), ("support.optimizers:CollectiveInStep",), TRAINING,
                           gpus=2, strategy="ddp", predict=False)
    row = run_compare(config).results[0]
    assert row.status == "ok", row.reason
    assert row.optimizer_step_repetitions >= 10


def test_folding_ranks() -> None:
    def rank_row(peak: int, tokens: float, status: str = "ok", step_s: float = 0.1, energy_j: float = 50.0,
                 forward_s: float = 0.02) -> CompareRow:
        return CompareRow("sgd", "torch", None, "sgd", status, reason=None if status == "ok" else "boom",
                          peak_bytes=peak, tokens_per_s=tokens, step_s_p50=step_s, state_logical_bytes=0,
                          forward_s=forward_s, energy_j=energy_j, micro_batch=1, seq_len=10, grad_accum=1, steps=2,
                          notes=("same on every rank",))

    folded = fold_ranks([rank_row(100, 10.0), rank_row(120, 12.0)], "fsdp")
    assert (folded.peak_bytes, folded.tokens_per_s, folded.world_size) == (120, 22.0, 2)  # fits only if all fit
    assert folded.energy_j == 100.0 and folded.joules_per_token == 100.0 / (10 * 2 * 2)  # both cards, all tokens
    assert folded.notes == ("same on every rank",)
    slow = fold_ranks([rank_row(100, 10.0), rank_row(120, 8.0, step_s=0.3, forward_s=0.2)], "fsdp")
    assert (slow.step_s_p50, slow.forward_s) == (0.3, 0.2)  # the slowest rank's times, whole
    broken = fold_ranks([rank_row(100, 10.0), rank_row(120, 12.0, status="oom")], "fsdp")
    assert broken.status == "oom" and broken.reason == "rank 1: boom"


def test_state_size_under_hsdp_shards_within_a_group_only() -> None:
    """4 fake ranks in 2 shard groups of 2: each rank holds half the state, not a quarter."""
    single = run_state_size(StateSizeConfig(ModelSelection("demo"), ("adamw",))).results[0]
    (row,) = run_state_size(StateSizeConfig(ModelSelection("demo"), ("adamw",), gpus=4, strategy="hsdp",
                                            shard_size=2)).results
    assert row.status == "ok", row.reason
    assert row.state_bytes == pytest.approx(single.state_bytes / 2, rel=0.02)


def test_state_size_per_rank_from_real_sharding() -> None:
    names = ("adamw", "adam-mini", "sgd")
    single = {r.optimizer: r for r in run_state_size(StateSizeConfig(ModelSelection("demo"), names)).results}
    sharded = run_state_size(StateSizeConfig(ModelSelection("demo"), names, gpus=2))
    for row in sharded.results:
        assert row.status == "ok" and row.world_size == 2, row.reason
        assert row.state_logical_bytes == single[row.optimizer].state_bytes  # the unsharded size, exactly
        assert row.state_bytes == pytest.approx(single[row.optimizer].state_bytes / 2, rel=0.02)
    assert sharded.reference_state_bytes == pytest.approx(single["adamw"].state_bytes / 2, rel=0.02)
