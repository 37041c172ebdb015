"""`optprof predict`: the training step on fake tensors, checked against what compare measures."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import torch.distributed as dist
from support.cli import run

from optprof.commands.predict import run_predict
from optprof.config import ModelSelection, PredictConfig, TrainingSettings


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


@pytest.mark.parametrize("name", ["adamw", "adam-mini", "galore"])
def test_a_repeated_fake_step_has_the_same_peak_so_each_micro_batch_is_traced_once(name: str) -> None:
    from optprof.commands.fake_step import FakeTrainer
    from optprof.distributed.sharding import fake_tensors
    from optprof.measure.tracker import tracked_step
    from optprof.optimizers.registry import resolve_optimizers

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
    assert (body["schema"], body["schema_version"]) == ("optprof.predict", 2)
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


