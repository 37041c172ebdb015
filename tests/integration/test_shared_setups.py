"""plan's setups of one strategy share a model: built, sharded and warmed up once, each setup's checkpointing and
loss applied for its steps and taken off after, each optimizer's step run once and its part of the trace spliced
into every later step's (`shallow_step.traced_setups`, `SharedTrainer.spliced`). Their traces must be the traces of
each setup built on its own, event for event and op for op, under every strategy plan searches, for every family
(`make families`) and for an optimizer whose step holds collectives (Adam-mini)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest

from optprof.commands.fake_step import StepFailed
from optprof.commands.shallow_step import Outcome, traced, traced_setups
from optprof.config import Amp, Checkpointing, DeviceKind, ModelSelection, PredictConfig, Strategy, TrainingSettings
from optprof.device import trace
from optprof.optimizers.registry import REGISTRY
from tests.support.architectures import ALL_FAMILIES, FAMILIES, write_tiny

CUDA_BF16 = TrainingSettings(device=DeviceKind.CUDA, seq_len=16, amp=Amp.BF16)
SETUPS = [  # (checkpointing, every K, loss chunks): each mode plan searches, and both losses
    (Checkpointing.FULL, 1, 8), (Checkpointing.NONE, 1, None), (Checkpointing.SELECTIVE_OP, 1, None),
    (Checkpointing.SELECTIVE_LAYER, 2, 8),
]


# hsdp over 4 ranks (12 s) with OPTPROF_ALL_FAMILIES=1 (make families); fsdp in the test tier
@pytest.mark.parametrize(("strategy", "shard_size"),
                         [(Strategy.FSDP, None), *([(Strategy.HSDP, 2)] if ALL_FAMILIES else [])])
def test_setups_on_one_model_trace_as_each_on_its_own(strategy: Strategy, shard_size: int | None,
                                                      model_dir: Callable[[str], str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    gpus = 4 if strategy == Strategy.HSDP else 2
    configs = [PredictConfig(ModelSelection(model_dir("tiny-llama")), ("adamw", "sgd"),
                             dataclasses.replace(CUDA_BF16, checkpointing=mode, checkpoint_every=every,
                                                 loss_chunks=chunks),
                             alloc_conf="", gpus=gpus, strategy=strategy, shard_size=shard_size, gpu="h100-sxm")
               for mode, every, chunks in SETUPS]
    entries = [REGISTRY["adamw"], REGISTRY["sgd"], REGISTRY["adam-mini"]]
    spliced = _spliced_count(monkeypatch)
    shared = traced_setups(configs, entries, [2, 3])
    # every trace written from its optimizer's part (run once, on the first setup's first micro-batch): none refused
    assert spliced() == len(entries) * 2 * len(SETUPS)
    for config, together in zip(configs, shared, strict=True):
        _assert_equal(together, traced(config, entries, config.training, [2, 3]), str(config.training.checkpointing))
    # the setups differ (so that equal above means each got its own checkpointing and loss)
    firsts = [outcomes[0][2].events for outcomes in shared]  # type: ignore[index]
    assert len({len(events) for events in firsts}) == len(SETUPS)


@pytest.mark.skipif(not ALL_FAMILIES, reason="every family: make families (OPTPROF_ALL_FAMILIES=1)")
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_takes_each_optimizers_step_from_its_first(family: str, tmp_path: Path) -> None:
    folder = write_tiny(family, tmp_path)
    configs = [PredictConfig(ModelSelection(folder), ("adamw", "adam-mini"),
                             dataclasses.replace(CUDA_BF16, checkpointing=mode, loss_chunks=chunks),
                             alloc_conf="", gpus=2, gpu="h100-sxm")
               for mode, chunks in ((Checkpointing.NONE, None), (Checkpointing.FULL, 8))]
    entries = [REGISTRY["adamw"], REGISTRY["adam-mini"]]
    try:
        shared = traced_setups(configs, entries, [2, 3])
    except Exception as exc:  # the model's own failure (jetmoe's tiny experts at this depth): alone too
        with pytest.raises(type(exc)):
            traced(configs[0], entries, configs[0].training, [2, 3])
        return
    for config, together in zip(configs, shared, strict=True):
        try:
            alone = traced(config, entries, config.training, [2, 3])
        except Exception as exc:  # the setup refused on its own model (a chunked loss where logits are softcapped)
            assert all(isinstance(outcome, StepFailed) for outcome in together), (family, exc)
            continue
        _assert_equal(together, alone, family)


def _spliced_count(monkeypatch: pytest.MonkeyPatch) -> Callable[[], int]:
    """How many traces `with_part` writes from here on (its refusals not counted)."""
    calls = []
    original = trace.TraceRecorder.with_part

    def counted(self: trace.TraceRecorder, *args: object) -> trace.AllocationTrace | None:
        found = original(self, *args)  # type: ignore[arg-type]
        calls.append(found is not None)
        return found

    monkeypatch.setattr(trace.TraceRecorder, "with_part", counted)
    return lambda: sum(calls)


def _assert_equal(together: list[Outcome], alone: list[Outcome], what: str) -> None:
    for one, other in zip(together, alone, strict=True):
        if not isinstance(one, dict) or not isinstance(other, dict):  # a failure: the same, whichever way
            assert type(one) is type(other) and str(one) == str(other), (what, one, other)
            continue
        assert one.keys() == other.keys()
        for size in one:
            assert one[size].events == other[size].events, (what, size)
            assert one[size].marks == other[size].marks and one[size].tags == other[size].tags, (what, size)
            assert one[size].ops == other[size].ops, (what, size)
