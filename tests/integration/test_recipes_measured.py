"""Optimizers that change the step or split the model, measured: LOMO's fused backward, SophiaH's gradient graph,
Muon's parts in a compare row."""

from __future__ import annotations

import dataclasses

import pytest

from optprof.optimizers.registry import REGISTRY, availability


def test_lomo_keeps_no_gradients_and_its_prediction_matches() -> None:
    """LOMO's fused backward replaces backward and step: no state, no gradients kept, so its peak is below SGD's
    (which holds every gradient at once), and predict (the same step on fake tensors) finds the same peak."""
    from optprof.commands.compare import run_compare
    from optprof.config import CompareConfig, ModelSelection, TrainingSettings

    if availability(REGISTRY["lomo"]) is not None:
        pytest.skip(availability(REGISTRY["lomo"]))
    training = TrainingSettings(device="cpu", micro_batch=1, seq_len=32, steps=2)
    report = run_compare(CompareConfig(ModelSelection("demo"), ("lomo", "sgd"), training))
    lomo, sgd = report.results
    assert lomo.status == sgd.status == "ok", (lomo.reason, sgd.reason)
    assert lomo.state_bytes == 0 and lomo.tensor_peak_bytes < sgd.tensor_peak_bytes
    assert lomo.breakdown["gradients"] < sgd.breakdown["gradients"]
    assert lomo.predicted_peak_bytes == pytest.approx(lomo.tensor_peak_bytes, rel=0.02)

    accumulating = run_compare(CompareConfig(ModelSelection("demo"), ("lomo",), dataclasses.replace(
        training, grad_accum=2), predict=False)).results[0]
    assert accumulating.status == "unsupported" and "--grad-accum 1" in accumulating.reason


def test_sophiah_keeps_the_gradient_graph_and_needs_a_second_derivative() -> None:
    """SophiaH's Hutchinson estimate differentiates the gradients: backward keeps their graph (the finding: it
    costs memory). SDPA's CPU kernel has no second derivative, so there it is `unsupported` with that reason;
    with eager attention it runs, and predict finds its peak."""
    from optprof.commands.compare import run_compare
    from optprof.config import CompareConfig, ModelSelection, TrainingSettings, TrainingSetup

    training = TrainingSettings(device="cpu", micro_batch=1, seq_len=32, steps=2)
    (default,) = run_compare(CompareConfig(ModelSelection("demo"), ("sophiah",), training, predict=False)).results
    assert default.status == "unsupported" and "no second derivative" in default.reason

    eager = ModelSelection("demo", setup=TrainingSetup(attention="eager"))
    sophia, adamw = run_compare(CompareConfig(eager, ("sophiah", "adamw"), training)).results
    assert sophia.status == adamw.status == "ok", (sophia.reason, adamw.reason)
    assert sophia.tensor_peak_bytes > adamw.tensor_peak_bytes
    assert sophia.predicted_peak_bytes == pytest.approx(sophia.tensor_peak_bytes, rel=0.02)


def test_a_compare_row_splits_muons_state_by_part_as_state_size_does() -> None:
    from optprof.commands.compare import run_compare
    from optprof.commands.state_size import run_state_size
    from optprof.config import CompareConfig, ModelSelection, StateSizeConfig, TrainingSettings

    training = TrainingSettings(device="cpu", micro_batch=1, seq_len=32, steps=2)
    (row,) = run_compare(CompareConfig(ModelSelection("demo"), ("muon",), training, predict=False)).results
    (sized,) = run_state_size(StateSizeConfig(ModelSelection("demo"), ("muon",))).results
    assert row.status == "ok", row.reason
    assert [part.name for part in row.state_parts] == ["muon", "adamw"]
    assert row.state_parts == sized.state_parts and sum(p.state_bytes for p in row.state_parts) == row.state_bytes
