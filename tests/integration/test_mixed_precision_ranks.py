"""--mp-policy and selective-op for real: FSDP2 over gloo ranks, against the same step on one rank, and compare's
measured tensor peak against predict's."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from support.policy_ranks import losses

from optprof.commands.compare import run_compare
from optprof.config import Checkpointing, CompareConfig, ModelSelection, Precision, TrainingSettings


# selective-op with the policy: both run for real in each test (each alone adds only time; the closing note of
# issue 26 has the policy alone too, to the same figures)
def test_the_policy_trains_alike_on_two_ranks_and_on_one(tmp_path: Path, model_dir: Callable[[str], str]) -> None:
    """The loss after 3 steps: 2 ranks each with half the batch equal 1 rank with all of it (both bf16 compute,
    fp32 reduction); the same step without the policy (fp32 compute) is further away, so the policy ran."""
    model, checkpointing = model_dir("tiny-llama"), Checkpointing.SELECTIVE_OP
    training = TrainingSettings(device="cpu", mp_param=Precision.BF16, mp_reduce=Precision.FP32,
                                checkpointing=checkpointing)
    two, one = losses(2, model, training, tmp_path), losses(1, model, training, tmp_path)
    full = losses(1, model, TrainingSettings(device="cpu", checkpointing=checkpointing), tmp_path)
    assert two[-1] == pytest.approx(one[-1], abs=1e-3)
    assert two[-1] != two[0]  # it trained
    assert abs(full[-1] - one[-1]) > abs(two[-1] - one[-1])  # bf16 compute differs from fp32 more than ranks do


def test_predicted_peak_matches_the_measured_one_under_the_policy() -> None:
    """At a size where the last reduce-scatter decides the peak: gloo copies a reduce-scatter's whole input first,
    which the prediction for CPU ranks allocates too (where forward and backward decide it, the one-device tests
    hold predict to the byte already)."""
    training = TrainingSettings(device="cpu", seq_len=64, micro_batch=2, steps=1,
                                mp_param=Precision.BF16, mp_reduce=Precision.FP32,
                                checkpointing=Checkpointing.SELECTIVE_OP)
    report = run_compare(CompareConfig(ModelSelection("demo"), ("adamw", "sgd"), training, gpus=2))
    assert report.config["precision"]["gathered"] == "bf16"
    for row in report.results:
        assert row.status == "ok", row.reason
        assert row.prediction_errors["tensor_peak_bytes"] == 0.0, row.prediction_errors  # to the byte
