"""plan's setups of one strategy share a model: built, sharded and warmed up once, each setup's checkpointing and
loss applied in the forked child of its step (`shallow_step.traced_setups`). Their traces must be the traces of
each setup built on its own, event for event and op for op, under every strategy plan searches."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest

from optprof.commands.shallow_step import traced, traced_setups
from optprof.config import Amp, Checkpointing, DeviceKind, ModelSelection, PredictConfig, Strategy, TrainingSettings
from optprof.optimizers.registry import REGISTRY
from tests.support.architectures import ALL_FAMILIES

CUDA_BF16 = TrainingSettings(device=DeviceKind.CUDA, seq_len=16, amp=Amp.BF16)
SETUPS = [  # (checkpointing, every K, loss chunks): each mode plan searches, and both losses
    (Checkpointing.FULL, 1, 8), (Checkpointing.NONE, 1, None), (Checkpointing.SELECTIVE_OP, 1, None),
    (Checkpointing.SELECTIVE_LAYER, 2, 8),
]


# hsdp over 4 ranks (12 s) with OPTPROF_ALL_FAMILIES=1 (make families); fsdp in the test tier
@pytest.mark.parametrize(("strategy", "shard_size"),
                         [(Strategy.FSDP, None), *([(Strategy.HSDP, 2)] if ALL_FAMILIES else [])])
def test_setups_on_one_model_trace_as_each_on_its_own(strategy: Strategy, shard_size: int | None,
                                                      model_dir: Callable[[str], str]) -> None:
    gpus = 4 if strategy == Strategy.HSDP else 2
    configs = [PredictConfig(ModelSelection(model_dir("tiny-llama")), ("adamw", "sgd"),
                             dataclasses.replace(CUDA_BF16, checkpointing=mode, checkpoint_every=every,
                                                 loss_chunks=chunks),
                             alloc_conf="", gpus=gpus, strategy=strategy, shard_size=shard_size, gpu="h100-sxm")
               for mode, every, chunks in SETUPS]
    entries = [REGISTRY["adamw"], REGISTRY["sgd"]]  # each optimizer's step joins after backward, as before
    shared = traced_setups(configs, entries, [2, 3])
    for config, together in zip(configs, shared, strict=True):
        alone = traced(config, entries, config.training, [2, 3])
        for one, other in zip(together, alone, strict=True):
            assert isinstance(one, dict) and isinstance(other, dict), (one, other)
            for size in (2, 3):
                assert one[size].events == other[size].events, (config.training.checkpointing, size)
                assert one[size].marks == other[size].marks and one[size].tags == other[size].tags
                assert one[size].ops == other[size].ops, (config.training.checkpointing, size)
    # the setups differ (so that equal above means each got its own checkpointing and loss)
    firsts = [outcomes[0][2].events for outcomes in shared]  # type: ignore[index]
    assert len({len(events) for events in firsts}) == len(SETUPS)
