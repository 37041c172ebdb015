"""What the sweep of every causal LM found (issue 37): a failed memory breakdown costs the breakdown, not the row;
a fake step in compare's own process that never ends costs its decision, not the command."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import pytest

from optprof.commands.compare import run_compare
from optprof.config import CompareConfig, ModelSelection, TrainingSettings

TRAINING = TrainingSettings(device="cpu", seq_len=16, steps=2, time_optimizer_step=False)


def test_a_failed_breakdown_costs_the_breakdown_not_the_row(monkeypatch: pytest.MonkeyPatch) -> None:
    def reversible(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("the tracker cannot follow reversible layers")  # reformer's, under MemTracker

    monkeypatch.setattr("optprof.measure.trial.tracked_step", reversible)
    config = CompareConfig(ModelSelection("demo"), ("sgd",), TRAINING, predict=False)
    row = run_compare(config, isolate=False).results[0]
    assert row.status == "ok" and row.tokens_per_s and row.tensor_peak_bytes is None
    assert any("memory breakdown's tracked step failed" in note for note in row.notes), row.notes


def test_a_prediction_that_never_ends_costs_the_prediction_not_the_command(monkeypatch: pytest.MonkeyPatch) -> None:
    def endless(*args: Any, **kwargs: Any) -> None:
        while True:  # a model's init looping on values fake tensors do not have
            time.sleep(0.01)

    monkeypatch.setattr("optprof.commands.compare.predict_rows", endless)
    monkeypatch.setattr("optprof.commands.compare._predicted", endless)
    config = CompareConfig(ModelSelection("demo"), ("sgd",), TRAINING, trial_timeout_s=1.0, preflight=False)
    started = time.monotonic()
    row = run_compare(config, isolate=False).results[0]
    assert time.monotonic() - started < 60
    assert row.status == "ok" and row.predicted_peak_bytes is None
    assert any("did not end within 1 s" in note for note in row.notes), row.notes


def test_git_is_unsupported_with_its_reason_and_xmod_runs_with_its_first_language(tmp_path: Any) -> None:
    """Transformers' own token-only step fails on both (issue 37). GIT needs image inputs: its rows say so as
    `unsupported`, never a bare `failed`. X-MOD only lacks a default language adapter: optprof chooses the config's
    first, says so on the model line, and its step runs."""
    from optprof.commands.predict import run_predict
    from optprof.config import PredictConfig
    from tests.support.architectures import write_tiny

    git = ModelSelection(write_tiny("git", tmp_path))
    for row in (run_compare(CompareConfig(git, ("adamw",), TRAINING, predict=False, preflight=False),
                            isolate=False).results[0],
                run_predict(PredictConfig(git, ("adamw",), TRAINING)).results[0]):
        assert row.status == "unsupported" and "image" in (row.reason or ""), row.reason
    xmod = run_compare(CompareConfig(ModelSelection(write_tiny("xmod", tmp_path)), ("adamw",), TRAINING,
                                     predict=False, preflight=False), isolate=False)
    assert xmod.results[0].status == "ok", xmod.results[0].reason
    assert xmod.model.warning is not None and "language adapter is en_XX" in xmod.model.warning


@pytest.mark.parametrize("model_type", ["gemma4_text", "reformer"])
def test_types_the_sweeps_generator_freed_are_predicted_as_measured(model_type: str, tmp_path: Any) -> None:
    """Two types transformers' own step trains once the sweep's tiny configs are consistent, which optprof failed:
    gemma4's head_dim is set per layer (reading the global one raises: the model line takes most layers' value
    and says the sizes differ), and reformer's reversible blocks run inside a custom Function's forward, where
    MemTracker's module hooks met inputs with no autograd node. Both predicted to the byte of the measured step."""
    from tests.benchmarks.sweep_causal_lms import tiny_config

    tiny_config(model_type).save_pretrained(tmp_path)
    training = dataclasses.replace(TRAINING, seq_len=32)  # reformer's axial positions (4 x 8) make 32 tokens
    report = run_compare(CompareConfig(ModelSelection(str(tmp_path)), ("adamw",), training, preflight=False),
                         isolate=False)
    row = report.results[0]
    assert row.status == "ok", row.reason
    assert row.predicted_peak_bytes == row.tensor_peak_bytes
    if model_type == "gemma4_text":
        assert report.model.warning is not None and "head_dim 16 / 512" in report.model.warning
