"""predict's speed levers against the methods they replace, to the byte (issue 28), on tiny models:

- one forward and backward shared by every optimizer (commands/fake_step.SharedTrainer) against each optimizer's
  own fake model and steps (FakeTrainer), over every registered optimizer, sharded and with a mixed-precision
  policy too (the architecture sweep does it for every family: test_architectures.py);
- the largest micro-batch solved from two traces and confirmed (predict.solved_max) against the search.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import TINY_LLAMA

from optprof.commands import predict
from optprof.config import DeviceKind, ModelSelection, Precision, PredictConfig, TrainingSettings
from optprof.optimizers.registry import REGISTRY
from optprof.results.rows import PredictRow
from optprof.results.vocab import MaxMethod

CUDA_BF16 = TrainingSettings(device=DeviceKind.CUDA, seq_len=16, amp="bf16")
MAX = 32  # the largest micro-batch searched


@pytest.fixture
def one_layer(tmp_path: Path) -> str:
    """tiny-llama with one decoder layer: every kind of tensor, half the ops of a step (this file steps a lot)."""
    folder = tmp_path / "one-layer-llama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**TINY_LLAMA, "num_hidden_layers": 1}))
    return str(folder)


def _figures(row: PredictRow) -> dict[str, Any]:
    """Everything a row says but the wall time it took."""
    return {k: v for k, v in dataclasses.asdict(row).items() if k != "predict_s"}


def _each_by_its_own_step(config: PredictConfig) -> list[PredictRow]:
    training = dataclasses.replace(config.training, seq_len=config.training.seq_len)
    return [predict.predict_optimizer(config, REGISTRY[name], training, lambda text: None)
            for name in config.optimizers]


@pytest.mark.skipif(not os.environ.get("OPTPROF_ALL_FAMILIES"),  # 17 s; three optimizers in the test below
                    reason="make families runs every registered optimizer")
def test_every_registered_optimizer_shares_one_forward_and_backward_to_the_byte(
        one_layer: str) -> None:
    """Every registered optimizer (those not installed here are rows alike): the shared trace gives each the
    figures of its own fake model and steps, the caching-allocator replay included."""
    names = tuple(REGISTRY)
    config = PredictConfig(ModelSelection(one_layer), names, CUDA_BF16, alloc_conf="",
                           reserve_bytes=0, jobs=2)
    shared = predict.run_predict(config).results
    for one, own in zip(shared, _each_by_its_own_step(config), strict=True):
        assert _figures(one) == _figures(own), one.optimizer
    statuses = {row.status for row in shared}
    assert "ok" in statuses and "failed" not in statuses, {r.optimizer: r.reason for r in shared}


@pytest.mark.parametrize("gpus", [1, 2])
def test_sharded_and_mixed_precision_steps_are_shared_to_the_byte(one_layer: str,
                                                                  gpus: int) -> None:
    """FSDP2 on a fake group (its tracker, its streams in the trace), with FSDP2's mixed-precision policy."""
    training = dataclasses.replace(CUDA_BF16, amp=None, mp_param=Precision.BF16, mp_reduce=Precision.FP32)
    names = ("adamw", "adam-mini", "lomo")
    config = PredictConfig(ModelSelection(one_layer), names, training, alloc_conf="", gpus=gpus,
                           reserve_bytes=0, jobs=2)
    shared = predict.run_predict(config).results
    for one, own in zip(shared, _each_by_its_own_step(config), strict=True):
        assert _figures(one) == _figures(own), one.optimizer
    lomo = "ok" if gpus == 1 else "unsupported"  # it updates inside backward, before any reduction across ranks
    assert [row.status for row in shared] == ["ok", "ok", lomo], [r.reason for r in shared]


# With the allocator model the card must hold cuBLAS's two 32 MiB workspaces besides the tiny model's step, whose
# 2 MiB segments grow within MAX on two layers (tiny-llama), not on one
@pytest.mark.parametrize(("alloc_conf", "gpu_memory", "names"), [("", 70_500_000, ("adamw",)),
                                                                 (None, 1_500_000, ("adamw", "adam-mini"))])
def test_the_solved_largest_micro_batch_is_the_searched_one(one_layer: str, model_dir: Callable[[str], str],
                                                            monkeypatch: pytest.MonkeyPatch, alloc_conf: str | None,
                                                            gpu_memory: int, names: tuple[str, ...]) -> None:
    """Solved from micro-batch 2 and 3 and confirmed at it and the next: the search's answer, in two probes."""
    model = model_dir("tiny-llama") if alloc_conf is not None else one_layer
    config = PredictConfig(ModelSelection(model), names, CUDA_BF16, alloc_conf=alloc_conf,
                           gpu_memory_bytes=gpu_memory, reserve_bytes=0, max_micro_batch=MAX, jobs=2)
    solved = predict.run_predict(config).results
    monkeypatch.setattr(predict, "SOLVE_FROM_TWO_TRACES", False)
    searched = predict.run_predict(config).results
    for fast, slow in zip(solved, searched, strict=True):
        assert fast.predicted_max_method == MaxMethod.SOLVED and fast.trials is not None and fast.trials <= 2
        assert slow.predicted_max_method == MaxMethod.SEARCHED and slow.trials is not None and slow.trials > 2
        assert 1 < fast.predicted_max_micro_batch < MAX  # a real answer, neither 1 nor the cap
        for field in ("predicted_max_micro_batch", "predicted_peak_at_max_bytes", "predicted_peak_bytes",
                      "predicted_reserved_bytes", "predicted_breakdown", "state_bytes"):
            assert getattr(fast, field) == getattr(slow, field), (fast.optimizer, field)


def test_a_solution_the_confirmation_contradicts_falls_back_to_the_search(one_layer: str,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    config = PredictConfig(ModelSelection(one_layer), ("adamw",), CUDA_BF16,
                           gpu_memory_bytes=1_500_000, reserve_bytes=0, max_micro_batch=MAX)
    right = predict.run_predict(config).results[0]
    monkeypatch.setattr(predict, "solved_max", lambda trainer, usable, cap: 2)  # a wrong solution
    row = predict.run_predict(config).results[0]
    assert row.predicted_max_method == MaxMethod.SEARCHED
    assert row.predicted_max_micro_batch == right.predicted_max_micro_batch


