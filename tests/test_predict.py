"""`optprof predict`: the training step on fake tensors, checked against what compare measures."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import torch.distributed as dist
from test_cli import run

from optprof.compare import run_compare
from optprof.config import CompareConfig, ModelSelection, PredictConfig, StateSizeConfig, TrainingSettings
from optprof.predict import run_predict
from optprof.state_size import run_state_size

TRIO = ("adamw", "adam-mini", "sgd")


def measured_and_predicted(model: str, seq_len: int, micro_batch: int = 1) -> tuple[dict, dict]:
    training = TrainingSettings(device="cpu", seq_len=seq_len, micro_batch=micro_batch, steps=1)
    measured = run_compare(CompareConfig(ModelSelection(model), TRIO, training), isolate=False)
    predicted = run_predict(PredictConfig(ModelSelection(model), TRIO, training))
    return ({r.optimizer: r for r in measured.results}, {r.optimizer: r for r in predicted.results})


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])  # GPT-2: tied head, fused c_attn, dropout
def test_predicted_peak_matches_the_measured_tensor_peak(name: str, model_dir: Callable[[str], str]) -> None:
    measured, predicted = measured_and_predicted(model_dir(name), seq_len=32, micro_batch=2)
    for optimizer in TRIO:
        real, fake = measured[optimizer], predicted[optimizer]
        assert real.status == fake.status == "ok", (real.reason, fake.reason)
        assert fake.predicted_peak_bytes == pytest.approx(real.tensor_peak_bytes, rel=0.02)
        assert fake.state_bytes == real.state_bytes
        assert fake.predicted_breakdown == pytest.approx(real.breakdown, rel=0.02, abs=1024)


@pytest.mark.parametrize(("amp", "dtype"), [("fp16", "float32"), ("bf16", "float32"), (None, "float16")])
def test_mixed_and_half_precision_predictions_match_state_size_and_the_measured_peak(amp: str | None,
                                                                                      dtype: str) -> None:
    """fp16 once predicted no state at all: its loss scaler read a placeholder as an overflow and skipped
    the optimizer step. Every precision: the state state-size measures, the peak compare measures."""
    training = TrainingSettings(device="cpu", seq_len=64, steps=1, amp=amp)  # type: ignore[arg-type]
    selection = ModelSelection("demo", dtype)  # type: ignore[arg-type]
    predicted = run_predict(PredictConfig(selection, ("adamw",), training)).results[0]
    measured = run_compare(CompareConfig(selection, ("adamw",), training), isolate=False).results[0]
    state_dtype = "float32" if amp else dtype  # amp keeps float32 master weights (and so float32 state)
    sized = run_state_size(StateSizeConfig(ModelSelection("demo", state_dtype), ("adamw",))).results[0]  # type: ignore[arg-type]
    assert predicted.status == measured.status == "ok", (predicted.reason, measured.reason)
    assert predicted.state_bytes == sized.state_bytes == measured.state_bytes > 0
    assert predicted.predicted_peak_bytes == pytest.approx(measured.tensor_peak_bytes, rel=0.02)


def test_demo_model_prediction_within_two_percent() -> None:
    measured, predicted = measured_and_predicted("demo", seq_len=64)
    for optimizer in TRIO:
        ratio = predicted[optimizer].predicted_peak_bytes / measured[optimizer].tensor_peak_bytes
        assert abs(ratio - 1) <= 0.02, (optimizer, ratio)


def test_fsdp_on_a_fake_group_halves_the_state_per_rank() -> None:
    training = TrainingSettings(device="cpu", seq_len=64)
    single = run_predict(PredictConfig(ModelSelection("demo"), ("adamw", "adam-mini"), training))
    sharded = run_predict(PredictConfig(ModelSelection("demo"), ("adamw", "adam-mini"), training, gpus=2))
    assert not dist.is_initialized()  # the fake group is gone again
    for one, two in zip(single.results, sharded.results, strict=True):
        assert two.status == "ok", two.reason
        assert two.world_size == 2
        assert two.state_bytes == pytest.approx(one.state_bytes / 2, rel=0.02)
        assert two.predicted_peak_bytes < one.predicted_peak_bytes
    assert any("FSDP2 over 2 ranks" in a for a in sharded.assumptions)


def test_zero2_keeps_parameters_gathered_after_forward() -> None:
    training = TrainingSettings(device="cpu", seq_len=256)
    peaks = {strategy: run_predict(PredictConfig(ModelSelection("demo"), ("adamw",), training, gpus=2,
                                                 strategy=strategy)).results[0] for strategy in ("fsdp", "zero2")}
    assert peaks["zero2"].state_bytes == peaks["fsdp"].state_bytes  # state sharded alike
    assert peaks["zero2"].predicted_breakdown["parameters"] > peaks["fsdp"].predicted_breakdown["parameters"]
    assert peaks["zero2"].predicted_peak_bytes > peaks["fsdp"].predicted_peak_bytes


def test_an_optimizer_whose_own_code_cannot_shard_is_unsupported(model_dir: Callable[[str], str]) -> None:
    """tiny-llama has 2 key/value heads: adam-mini's per-head view of k_proj cannot split over 4 shards, and
    torch's Adafactor cannot take DTensor gradients; both are findings about those packages, not failures."""
    training = TrainingSettings(device="cpu", seq_len=16)
    config = PredictConfig(ModelSelection(model_dir("tiny-llama")), ("adamw", "adam-mini", "adafactor"), training,
                           gpus=4)
    rows = {row.optimizer: row for row in run_predict(config).results}
    assert rows["adamw"].status == "ok"
    for name, package in (("adam-mini", "adam-mini"), ("adafactor", "torch")):
        assert rows[name].status == "unsupported", rows[name].reason
        assert rows[name].reason.startswith(f"{package}'s own code cannot run on FSDP2-sharded")


def test_largest_micro_batch_and_determinism() -> None:
    config = PredictConfig(ModelSelection("demo"), ("sgd", "adamw"), TrainingSettings(device="cpu", seq_len=128),
                           gpu_memory_bytes=200 * 10**6)
    first, second = run_predict(config), run_predict(config)
    sgd, adamw = first.results
    assert sgd.predicted_max_micro_batch > adamw.predicted_max_micro_batch >= 1
    assert adamw.predicted_peak_at_max_bytes <= 200 * 10**6
    keys = ("state_bytes", "predicted_peak_bytes", "predicted_max_micro_batch", "predicted_breakdown")
    for a, b in zip(first.results, second.results, strict=True):
        assert all(getattr(a, k) == getattr(b, k) for k in keys)


@pytest.mark.parametrize("name", ["adamw", "adam-mini", "galore"])
def test_a_repeated_fake_step_has_the_same_peak_so_each_micro_batch_is_traced_once(name: str) -> None:
    from optprof.optimizers.registry import resolve_optimizers
    from optprof.parallel import fake_tensors
    from optprof.predict import FakeTrainer, tracked_step

    training = TrainingSettings(device="cpu", seq_len=64)
    config = PredictConfig(ModelSelection("demo"), (name,), training)
    with fake_tensors():
        trainer = FakeTrainer(config, resolve_optimizers([name])[0], training)
        first = trainer.peak(2)
        again = tracked_step(trainer._step(2), trainer.state_bytes)  # what the cache saves
        assert trainer.peak(2) is first
    assert (again.tensor_peak_bytes, again.breakdown) == (first.tensor_peak_bytes, first.breakdown)


def test_cli_predict_labels_everything_predicted(capsys) -> None:  # type: ignore[no-untyped-def]
    code, out, _ = run(["predict", "demo", "-o", "sgd", "--seq-len", "64", "--gpu-memory", "4GiB"], capsys)
    assert code == 0 and "PREDICTED for cuda" in out and "Assumed:" in out and "predicted" in out
    code, out, _ = run(["predict", "demo", "-o", "sgd", "--seq-len", "64", "--device", "cpu", "-f", "json"], capsys)
    body = json.loads(out)
    assert (body["schema"], body["schema_version"]) == ("optprof.predict", 1)
    row = body["results"][0]
    assert row["predicted_peak_bytes"] > 0 and row["micro_batch"] == 1 and row["predicted_max_micro_batch"] is None
    assert set(row["predicted_breakdown"]) == {"parameters", "gradients", "optimizer_state", "activations",
                                               "temporaries"}
    assert body["assumptions"] and body["config"]["reserve_bytes"] == 0  # nothing to reserve on a CPU
    for argv, message in (
        (["predict", "--gpu-memory", "1GiB", "--reserve", "2GiB"], "larger than --reserve"),
        (["predict", "--gpu-memory", "lots"], "cannot read 'lots' as a size"),
    ):
        code, _, err = run(argv, capsys)
        assert code == 2 and message in err


def test_the_dropout_assumption_only_where_the_model_had_dropout() -> None:
    def dropout_lines(model: str) -> list[str]:
        training = TrainingSettings(device="cuda", seq_len=32)
        report = run_predict(PredictConfig(ModelSelection(model), ("sgd",), training))
        return [line for line in report.assumptions if "dropout" in line]

    assert dropout_lines("demo") == []  # Llama's attention_dropout is 0 already: nothing was changed
    assert dropout_lines("gpt2") == ["attention dropout (attn_pdrop 0.1) was set to 0 so that SDPA takes the "
                                     "flash-style path, whose memory matches CUDA's flash / memory-efficient kernels"]


def test_optimizers_predicted_at_once_give_what_one_after_another_gives() -> None:
    """--jobs 2: each optimizer in a forked worker; every figure as in this process, rows in order."""
    import dataclasses

    training = TrainingSettings(device="cuda", seq_len=64)
    config = PredictConfig(ModelSelection("demo"), ("sgd", "adamw", "adam-mini"), training, gpu_memory_bytes=10**9,
                           max_micro_batch=8)
    at_once = run_predict(dataclasses.replace(config, jobs=2)).results
    one_by_one = run_predict(config).results
    assert [r.optimizer for r in at_once] == ["sgd", "adamw", "adam-mini"]
    for a, b in zip(at_once, one_by_one, strict=True):
        assert a.status == "ok" and dataclasses.replace(a, predict_s=None) == dataclasses.replace(b, predict_s=None)
