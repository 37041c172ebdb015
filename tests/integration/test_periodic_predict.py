"""predict by layer-periodic tracing (issue 36): its rows, read from a trace written from two shallow copies, equal
the full method's (the whole model traced under MemTracker).

The tensor peak a trace gives (`trace_peak`) is MemTracker's to the byte for every family of the sweep (with
OPTPROF_ALL_FAMILIES=1, `make families`), and so is the state the trace tags; a deep llama predicted both ways
gives the same row, figure for figure, but for the loss's bytes, which the trace's breakdown files under
temporaries where MemTracker says activations. MemTracker's activations are all that a forward allocated, the
trace's what a forward left for backward: where the peak falls inside a forward (mamba's scan, mpt's attention
bias), what the forward frees before its end is activations to MemTracker and temporaries to the trace."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from optprof.commands import predict
from optprof.commands.fake_step import FakeTrainer, fake_run
from optprof.commands.predict import run_predict
from optprof.config import DeviceKind, ModelSelection, PredictConfig, TrainingSettings
from optprof.measure.tracker import trace_peak, traced_state_bytes
from optprof.optimizers.registry import REGISTRY
from tests.integration.test_periodic_trace import deep_config
from tests.support.architectures import ALL_FAMILIES, FAMILIES

CUDA_BF16 = TrainingSettings(device=DeviceKind.CUDA, seq_len=16, amp="bf16")
SKIP = {"jetmoe": "its tiny config's experts fail to build at these depths"}
# what the trace's tags put in temporaries where MemTracker says activations at a peak in backward (the loss, made
# after the model's forward and before backward): bytes per rank, at most
MOVED_BYTES = 16


@pytest.mark.skipif(not ALL_FAMILIES, reason="make families: the rows' test below holds llama's peak to MemTracker's")
@pytest.mark.parametrize("family", FAMILIES if ALL_FAMILIES else ("llama",))
def test_the_traces_peak_is_memtrackers(family: str, tmp_path: Path) -> None:
    if family in SKIP:
        pytest.skip(SKIP[family])
    deep_config(family, 4).to_json_file(tmp_path / "config.json")
    config = PredictConfig(ModelSelection(str(tmp_path)), ("adam-mini",), CUDA_BF16, alloc_conf="", gpus=2)
    with fake_run(config, CUDA_BF16) as (mesh, _):
        trainer = FakeTrainer(config, REGISTRY["adam-mini"], CUDA_BF16, mesh)
        for micro_batch in (1, 2):
            tracked, read = trainer.peak(micro_batch), trace_peak(trainer.trace(micro_batch))
            assert read.tensor_peak_bytes == tracked.tensor_peak_bytes
            assert read.fwd_bwd_peak_bytes == tracked.fwd_bwd_peak_bytes
            assert traced_state_bytes(trainer.trace(micro_batch)) == trainer.state_bytes
            for category in ("parameters", "gradients", "optimizer_state"):
                assert read.breakdown[category] == tracked.breakdown[category], category
            # what a forward left for backward is in both activations; MemTracker's also hold what the forward
            # freed before its end and the loss (the peak inside a forward: mamba's scan, mpt's attention bias)
            moved = read.breakdown["temporaries"] - tracked.breakdown["temporaries"]
            assert moved >= 0
            assert read.breakdown["activations"] == tracked.breakdown["activations"] - moved


def test_predict_by_copies_equals_the_full_method(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """8 layers on one device with an H100's time (FSDP2's ranks and streams: the trace tests), on a card of 72 MiB
    (two 32 MiB cuBLAS workspaces, then the step): the largest micro-batch (16) lies past the sizes solved from (2
    and 3), so a second round traces the copies at it and the next size."""
    monkeypatch.setattr(predict, "COPIES_AT_MOST", 0.5)  # copies of 3 and 4 layers: 8 are deep enough
    deep_config("llama", 8).to_json_file(tmp_path / "config.json")
    config = PredictConfig(ModelSelection(str(tmp_path)), ("adamw", "adam-mini"), CUDA_BF16, alloc_conf="",
                           gpu="h100-sxm", gpu_memory_bytes=72 * 2**20, max_micro_batch=64)
    by_copies = run_predict(config)
    whole = run_predict(dataclasses.replace(config, full_model=True))
    for ours, theirs in zip(by_copies.results, whole.results, strict=True):
        assert ours.status == theirs.status == "ok"
        assert ours.trace_method is not None and ours.trace_method.startswith("layer-periodic")
        assert theirs.trace_method is None
        assert (ours.predicted_max_micro_batch or 0) > 4  # 16 here
        moved = ours.predicted_breakdown["temporaries"] - theirs.predicted_breakdown["temporaries"]
        assert 0 <= moved <= MOVED_BYTES
        assert dataclasses.replace(ours, trace_method=None, predict_s=None, predicted_breakdown={}) == \
            dataclasses.replace(theirs, predict_s=None, predicted_breakdown={})
    assert any("layer-periodic" in line for line in by_copies.assumptions)


def test_a_model_too_shallow_for_copies_is_traced_whole(tmp_path: Path) -> None:
    """8 layers: copies of 3 and 4 would cost about as much as the model (`COPIES_AT_MOST`)."""
    deep_config("llama", 8).to_json_file(tmp_path / "config.json")
    config = PredictConfig(ModelSelection(str(tmp_path)), ("adamw",), CUDA_BF16, alloc_conf="", gpus=2,
                           gpu="h100-sxm")
    row = run_predict(config).results[0]
    assert row.status == "ok" and row.trace_method is None
