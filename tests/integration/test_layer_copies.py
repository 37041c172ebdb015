"""Copies of the first 1, 2 and 3 layers stand for the whole model: every registered optimizer's figures are the
same either way, on bundled models of 12 to 32 layers (`make test`: 12 and 22; `make families` adds Llama-2-7B's 32)."""

from __future__ import annotations

import pytest
from support.architectures import ALL_FAMILIES

from optprof.commands.state_size import run_state_size
from optprof.config import ModelSelection, StateSizeConfig
from optprof.optimizers.registry import REGISTRY
from optprof.results.vocab import LayerExtent


# gpt2 in the test tier (its five minutes); tinyllama (13 s) and Llama-2-7B in make families
@pytest.mark.parametrize("model", ["gpt2", *(["tinyllama-1.1b", "llama-2-7b"] if ALL_FAMILIES else [])])
def test_copies_of_the_first_layers_give_the_whole_models_figures(model: str) -> None:
    """Every registered optimizer, extrapolated from 1, 2 and 3 layers and stepped on the whole model: the same
    bytes, dtypes, tensors and second-moment entries, exactly."""
    names = tuple(REGISTRY)
    fast = run_state_size(StateSizeConfig(ModelSelection(model), names)).results
    whole = run_state_size(StateSizeConfig(ModelSelection(model), names, full_model=True)).results
    figures = ("status", "reason", "state_bytes", "state_dtypes", "state_tensors", "second_moment_entries",
               "bytes_per_param")
    for quick, slow in zip(fast, whole, strict=True):
        assert {f: getattr(quick, f) for f in figures} == {f: getattr(slow, f) for f in figures}, quick.optimizer
        if quick.status == "ok":
            assert quick.layer_extent == LayerExtent.EXTRAPOLATED and slow.layer_extent is None, quick.optimizer
