"""`optprof compare`: real training steps on the demo model, compared with state-size and with each other."""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import pytest
import torch
from rich.console import Console
from support.cli import run

from optprof.commands.compare import run_compare
from optprof.commands.state_size import run_state_size
from optprof.config import (
    Amp,
    Checkpointing,
    CompareConfig,
    ModelSelection,
    SearchSettings,
    StateSizeConfig,
    TrainingSettings,
    resolve_seq_len,
)
from optprof.errors import UsageError
from optprof.model.loading import load_model
from optprof.render import text as report
from optprof.render.console import PIPE_WIDTH
from optprof.results.reports import CompareReport
from optprof.units import parse_bytes

MUST_SHOW = ("adamw", "adam-mini", "sgd", "momentum", "adafactor")
TRAINING = TrainingSettings(device="cpu", seq_len=128, steps=6, sample_interval_s=0.005)  # 6: a 95% interval


@pytest.fixture(scope="module")
def demo_report() -> CompareReport:
    """The five optimizers on the bundled demo model, trials in this process (isolation is tested below)."""
    config = CompareConfig(ModelSelection("demo"), MUST_SHOW, TRAINING)
    return run_compare(config, isolate=False)


def rows(report_: CompareReport) -> dict:
    return {row.optimizer: row for row in report_.results}


def test_every_trial_ran_and_trained(demo_report: CompareReport) -> None:
    by_name = rows(demo_report)
    assert list(by_name) == list(MUST_SHOW)
    for row in by_name.values():
        assert row.status == "ok", (row.optimizer, row.reason)
        assert row.tokens_per_s > 0 and row.step_s_p90 >= row.step_s_p50 > 0
        assert (row.micro_batch, row.seq_len, row.grad_accum, row.world_size) == (1, 128, 1, 1)
        assert row.tokens_per_s == pytest.approx(128 / row.step_s_p50)
        phases = row.forward_s + row.backward_s + row.clip_s + row.optimizer_s
        assert phases <= max(row.step_times_s) * 1.001  # phases are disjoint parts of a step
        assert 0 < row.optimizer_share < 1
        assert row.sampler_samples >= 2 and row.rss_peak_bytes >= row.tensor_peak_bytes
    losses = {row.loss_first for row in by_name.values()}
    assert len(losses) == 1  # same seed: the same weights and tokens for every optimizer
    assert by_name["adamw"].loss_last < by_name["adamw"].loss_first  # it trains


def test_state_bytes_equal_state_size(demo_report: CompareReport) -> None:
    measured = run_state_size(StateSizeConfig(ModelSelection("demo"), MUST_SHOW, jobs=1))
    on_meta = {row.optimizer: row.state_bytes for row in measured.results}
    live = {row.optimizer: row.state_bytes for row in demo_report.results}
    assert live == on_meta


def test_peak_holds_parameters_gradients_and_state(demo_report: CompareReport) -> None:
    buffers = sum(b.numel() * b.element_size() for b in load_model("demo", device="cpu").module.buffers())
    for row in demo_report.results:
        assert row.peak_source == "tensor_peak" and row.peak_bytes == row.tensor_peak_bytes
        assert row.param_bytes == row.grad_bytes == 4 * demo_report.model.params  # float32, untied
        assert row.peak_bytes >= row.param_bytes + row.grad_bytes + row.state_bytes
        # MemTracker's categories against a storage walk; the category holds buffers too (rotary's inv_freq)
        assert row.breakdown["parameters"] == row.param_bytes + buffers
        assert 0 <= row.breakdown["temporaries"] < row.tensor_peak_bytes


def test_at_a_backward_peak_optimizers_differ_by_their_state_alone() -> None:
    """At 512 tokens demo's peak falls at the start of backward, where every optimizer holds the same
    parameters, activations and temporaries and no gradients yet: peaks differ by exactly the state, and
    the breakdown puts the state there, not in activations or temporaries."""
    training = TrainingSettings(device="cpu", seq_len=512, steps=1)
    config = CompareConfig(ModelSelection("demo"), ("sgd", "momentum", "adamw"), training, predict=False)
    sgd, *others = run_compare(config, isolate=False).results
    for row in others:
        assert row.tensor_peak_bytes - sgd.tensor_peak_bytes == row.state_bytes - sgd.state_bytes > 0
        assert row.breakdown["optimizer_state"] - sgd.breakdown["optimizer_state"] == row.state_bytes
        assert row.breakdown["activations"] == sgd.breakdown["activations"] > 0
        assert row.breakdown["temporaries"] == sgd.breakdown["temporaries"]


def test_every_row_has_its_intervals_and_the_run_its_order(demo_report: CompareReport) -> None:
    for row in demo_report.results:
        low, high = row.tokens_per_s_ci95
        assert low <= row.tokens_per_s <= high
        low, high = row.optimizer_step_s_ci95
        assert low <= row.optimizer_step_s <= high and row.optimizer_step_repetitions >= 10
        assert row.predicted_peak_bytes == row.tensor_peak_bytes  # the prediction, checked: exact on CPU
        assert row.prediction_errors == {"tensor_peak_bytes": 0.0}
    assert sorted(demo_report.config["trial_order"]) == sorted(MUST_SHOW)
    assert demo_report.config["optimizers"] == list(MUST_SHOW)  # rows and config keep the user's order
    assert demo_report.fwd_bwd_spread is not None and demo_report.fwd_bwd_spread >= 0


def test_state_ordering(demo_report: CompareReport) -> None:
    state = {row.optimizer: row.state_bytes for row in demo_report.results}
    assert state["sgd"] < state["momentum"] <= state["adam-mini"] < state["adamw"]
    assert state["adafactor"] < state["momentum"]


def test_table_and_csv(demo_report: CompareReport) -> None:
    console = Console(width=160, record=True)
    console.print(report.render(demo_report))
    text = console.export_text()
    assert "MB = 10^6 bytes" in text and "live tensors" in text and "adam-mini" in text
    assert "Peak memory by category" in text
    narrow = Console(width=PIPE_WIDTH, record=True)  # what a pipe or a file gets
    narrow.print(report.render(demo_report))
    assert "…" not in narrow.export_text()  # no column cut short
    csv = demo_report.to_csv()
    header = csv.splitlines()[0].split(",")
    assert {"tokens_per_s", "peak_bytes", "breakdown_activations", "state_bytes"} <= set(header)
    body = demo_report.to_dict()
    assert (body["schema"], body["schema_version"]) == ("optprof.compare", 1)
    assert body["config"]["seq_len"] == 128 and body["device"]["type"] == "cpu"


def test_accumulation_clipping_checkpointing_and_amp(model_dir: Callable[[str], str]) -> None:
    settings = TrainingSettings(device="cpu", seq_len=32, micro_batch=2, grad_accum=2, grad_clip=1.0,
                                checkpointing=Checkpointing.FULL, steps=2, amp=Amp.BF16)
    result = run_compare(CompareConfig(ModelSelection(model_dir("tiny-llama")), ("adamw",), settings), isolate=False)
    row = result.results[0]
    assert row.status == "ok", row.reason
    assert row.tokens_per_s == pytest.approx(2 * 32 * 2 / row.step_s_p50)
    assert row.clip_s > 0
    assert row.param_bytes == 4 * result.model.params  # amp keeps float32 master weights
    fp16 = TrainingSettings(device="cpu", seq_len=32, steps=2, amp="fp16")  # with a gradient scaler
    row = run_compare(CompareConfig(ModelSelection(model_dir("tiny-llama")), ("sgd",), fp16), isolate=False).results[0]
    assert row.status == "ok", row.reason


def test_default_sequence_length_is_capped_and_checked() -> None:
    context = load_model("llama-2-7b").info.max_position_embeddings  # 4096 positions
    assert resolve_seq_len(None, context, "cuda") == 2048
    assert resolve_seq_len(None, context, "cpu") == 512
    assert resolve_seq_len(4096, context, "cuda") == 4096
    with pytest.raises(UsageError, match="exceeds the model's context length"):
        resolve_seq_len(4097, context, "cuda")


def test_cli_isolates_trials_and_keeps_the_other_rows(model_dir: Callable[[str], str], capsys) -> None:  # type: ignore[no-untyped-def]
    """Fresh processes: an injected OOM is a row, a killed process a failed row, and sgd still reports."""
    argv = ["compare", model_dir("tiny-llama"), "--device", "cpu", "--seq-len", "16", "--steps", "2", "-f", "json",
            "-o", "sgd,support.optimizers:OutOfMemoryOnStep,support.optimizers:KilledOnStep"]
    code, out, err = run(argv, capsys)
    assert code == 1  # a killed trial is a failure; the OOM alone would not be
    body = json.loads(out)
    by_name = {r["optimizer"].rpartition(":")[2]: r for r in body["results"]}
    assert by_name["sgd"]["status"] == "ok" and by_name["sgd"]["tokens_per_s"] > 0
    assert by_name["OutOfMemoryOnStep"]["status"] == "oom"
    assert by_name["KilledOnStep"]["status"] == "failed" and "SIGKILL" in by_name["KilledOnStep"]["reason"]
    assert body["config"]["isolated"] is True
    assert "sgd:" in err  # a line per finished trial


def test_cli_bad_input_is_one_line(capsys) -> None:  # type: ignore[no-untyped-def]
    cases = [] if torch.cuda.is_available() else [(["compare", "--device", "cuda"], "no CUDA device")]
    for argv, message in (
        *cases,
        (["compare", "--amp", "fp16", "--dtype", "bfloat16"], "cannot unscale bfloat16 gradients"),
        (["compare", "--warmup", "1"], "at least 2"),
        (["compare", "--seq-len", "100000"], "exceeds the model's context length"),
        (["compare", "-o", "adamx"], "unknown optimizer"),
    ):
        code, _, err = run(argv, capsys)
        assert code == 2 and message in err and "Traceback" not in err, argv


# --micro-batch auto (the largest micro-batch that fits)

LIMIT = 200 * 10**6  # demo at 128 tokens: sgd, adam-mini and adamw stop at different sizes under this


@pytest.fixture(scope="module")
def searched() -> CompareReport:
    training = TrainingSettings(device="cpu", seq_len=128, steps=2, memory_limit_bytes=LIMIT)
    config = CompareConfig(ModelSelection("demo"), ("sgd", "adam-mini", "adamw"), training,
                           search=SearchSettings(max_micro_batch=64))
    return run_compare(config, isolate=False)


def test_search_orders_optimizers_by_what_they_leave_free(searched: CompareReport) -> None:
    best = {row.optimizer: row.max_micro_batch for row in searched.results}
    assert all(row.status == "ok" for row in searched.results)
    assert best["sgd"] >= best["adam-mini"] >= best["adamw"] >= 1
    assert best["sgd"] > best["adamw"]  # the limit was chosen so that they differ


def test_search_records_prove_the_answer(searched: CompareReport) -> None:
    for row in searched.results:
        probes = {p.micro_batch: p for p in row.search}
        at_max = probes[row.max_micro_batch]
        assert at_max.fits and at_max.peak_bytes <= LIMIT == at_max.limit_bytes
        above = probes.get(row.max_micro_batch + 1)
        if above is not None:
            assert not above.fits and above.peak_bytes > LIMIT
        assert all(p.fits == (p.micro_batch <= row.max_micro_batch) for p in row.search)  # monotone
        assert row.trials == len(row.search) <= math.ceil(math.log2(row.max_micro_batch)) + 2
        # predict (fake tensors) named the answer, so the search only had to confirm it and the size above
        assert row.predicted_max_micro_batch == row.max_micro_batch and row.trials == 2
        # measured at the maximum, in its own trial: the same step, so the same peak
        assert row.micro_batch == row.max_micro_batch and row.peak_bytes == at_max.peak_bytes


def test_a_searched_report_round_trips_with_its_probes(searched: CompareReport) -> None:
    again = CompareReport.from_json(searched.to_json())
    assert again == searched and again.results[0].search[0] == searched.results[0].search[0]


def test_tokens_at_the_common_micro_batch(searched: CompareReport) -> None:
    common = min(row.max_micro_batch for row in searched.results)
    for row in searched.results:
        assert row.common_micro_batch == common and row.tokens_per_s_at_common > 0
        if row.max_micro_batch == common:
            assert row.tokens_per_s_at_common == row.tokens_per_s


def test_not_fitting_at_one_is_a_result(model_dir: Callable[[str], str]) -> None:
    training = TrainingSettings(device="cpu", seq_len=128, steps=2, memory_limit_bytes=100 * 10**6)
    config = CompareConfig(ModelSelection("demo"), ("sgd", "adamw"), training,
                           search=SearchSettings(max_micro_batch=2), preflight=False)  # the search's own finding
    sgd, adamw = run_compare(config, isolate=False).results
    assert sgd.status == "ok" and sgd.max_micro_batch >= 1
    assert adamw.status == "does not fit" and adamw.max_micro_batch == 0 and adamw.trials == 1
    assert adamw.short_by_bytes == adamw.search[0].peak_bytes - 100 * 10**6 > 0
    assert sgd.common_micro_batch == sgd.max_micro_batch  # adamw fits nothing: not part of the common size


def test_cli_search_in_fresh_processes_stops_at_the_cap(capsys) -> None:  # type: ignore[no-untyped-def]
    argv = ["compare", "demo", "--device", "cpu", "-o", "sgd", "--seq-len", "32", "--steps", "2",
            "--memory-limit", "10GB", "--max-micro-batch", "4", "-f", "json"]
    code, out, _ = run(argv, capsys)
    assert code == 0
    row = json.loads(out)["results"][0]
    assert (row["max_micro_batch"], row["max_micro_batch_capped"], row["micro_batch"]) == (4, True, 4)
    assert [p["micro_batch"] for p in row["search"]][-1] == 4 and row["trials"] == len(row["search"]) <= 3
    assert all(p["fits"] and p["peak_bytes"] > 0 and p["limit_bytes"] == 10**10 for p in row["search"])


def test_cli_micro_batch_and_memory_limit_input(capsys) -> None:  # type: ignore[no-untyped-def]
    for argv, message in (
        (["compare", "--device", "cpu", "--micro-batch", "auto"], "needs --memory-limit"),
        (["compare", "--micro-batch", "0"], "at least 1"),
        (["compare", "--memory-limit", "12 parsecs"], "cannot read '12 parsecs' as a size"),
    ):
        code, _, err = run(argv, capsys)
        assert code == 2 and message in err, argv
    assert parse_bytes("24GiB", "x") == 24 * 2**30 and parse_bytes("1.5 GB", "x") == 1_500_000_000
    assert parse_bytes("4096", "x") == 4096


def test_prediction_errors_against_each_cuda_source() -> None:
    from optprof.commands.compare import prediction_errors
    from optprof.results.rows import CompareRow

    gib = 2**30
    row = CompareRow("adamw", "torch", None, "adaptive", "ok", torch_max_allocated_bytes=10 * gib,
                     torch_max_reserved_bytes=11 * gib, nvml_process_peak_bytes=12 * gib)
    errors = prediction_errors(row, predicted_peak=10 * gib, reserve_bytes=2 * gib)
    assert errors == pytest.approx({"torch_max_allocated_bytes": 0.0, "torch_max_reserved_bytes": 10 / 11 - 1,
                                    "nvml_process_peak_bytes": 0.0})  # peak + reserve against NVML's count
