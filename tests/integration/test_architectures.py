"""Every decoder family through state-size, predict and compare: each row works, or says why it cannot
(`unsupported`, with the reason); never `failed`, never an internal error. predict's rows, from one forward and
backward shared by the optimizers, equal those of each optimizer's own steps (issue 28). `make test` runs the
representative families (`support.architectures.REPRESENTATIVE`); `make families` runs all of them."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.architectures import ALL_FAMILIES, FAMILIES, MOE, NO_ATTENTION, REPRESENTATIVE, sweep, write_tiny

from optprof.model.loading import load_model
from optprof.optimizers.registry import DEFAULT_OPTIMIZERS

PREDICTION_TOLERANCE = 0.02  # predicted vs measured tensor peak on CPU
ROUTING_COUNTED = ("mixtral", "qwen3_moe", "olmoe", "gpt_oss", "deepseek_v3", "qwen2_moe")


@pytest.mark.parametrize("family", FAMILIES if ALL_FAMILIES else REPRESENTATIVE)
def test_family_runs_every_command(family: str, tmp_path: Path) -> None:
    result = sweep(family, tmp_path, DEFAULT_OPTIMIZERS)
    for (command, optimizer), (status, reason) in result.statuses.items():
        assert status in ("ok", "unsupported"), (command, optimizer, status, reason)
        if status == "unsupported":
            assert reason, (command, optimizer)
    assert all(status == "ok" for (command, _), (status, _) in result.statuses.items() if command != "predict")
    for optimizer, error in result.prediction_error.items():
        assert abs(error) <= PREDICTION_TOLERANCE, (optimizer, error)
    assert result.shared_differs == {"adamw": []}  # one forward and backward for all: to the byte
    loads = set(result.expert_load.values())
    if family in ROUTING_COUNTED:  # transformers' experts modules: compare saw the routing
        assert all(load is not None and load >= 1.0 for load in loads), loads
    elif family not in MOE:
        assert loads == {None}


@pytest.mark.parametrize("family", MOE)
def test_moe_model_line(family: str, tmp_path: Path) -> None:
    info = load_model(write_tiny(family, tmp_path)).info
    assert info.num_experts == 4 and info.experts_per_token == 2
    assert info.active_params is not None and info.active_params < info.params


@pytest.mark.parametrize("family", NO_ATTENTION)
def test_no_attention_fields(family: str, tmp_path: Path) -> None:
    info = load_model(write_tiny(family, tmp_path)).info
    assert (info.num_heads, info.num_kv_heads, info.head_dim) == (None, None, None)
