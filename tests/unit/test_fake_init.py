"""Initialisers that loop on values (trunc_normal_'s redraws) end on fake tensors, and are themselves again after."""

from __future__ import annotations

import torch

from optprof.distributed.sharding import fake_tensors


def test_trunc_normal_ends_on_fake_tensors_and_is_restored() -> None:
    from transformers import initialization

    before = (torch.nn.init.trunc_normal_, initialization.TORCH_INIT_FUNCTIONS["trunc_normal_"])
    with fake_tensors():
        weight = torch.empty(64, 64)
        torch.nn.init.trunc_normal_(weight, std=0.02)  # redrew forever: `mask.any()` was always True
        initialization.trunc_normal_(weight, std=0.02)  # transformers' wrapper, as models' _init_weights call it
        assert weight.shape == (64, 64)
    assert (torch.nn.init.trunc_normal_, initialization.TORCH_INIT_FUNCTIONS["trunc_normal_"]) == before
    real = torch.nn.init.trunc_normal_(torch.empty(1000), a=-0.5, b=0.5)  # the real one, on real values
    assert float(real.min()) >= -0.5 and float(real.max()) <= 0.5


def test_an_output_shape_from_values_is_unsupported_not_failed() -> None:
    """dbrx's and longcat_flash's expert loops call nonzero(), whose output shape fake tensors cannot know."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from optprof.commands.fake_step import _output_shape_from_values

    try:
        with FakeTensorMode():
            torch.nonzero(torch.ones(3))
    except Exception as exc:
        caught: BaseException = exc
    assert _output_shape_from_values(caught)
    assert not _output_shape_from_values(ValueError("an ordinary failure"))


def test_a_model_that_casts_its_own_submodule_builds_on_fake_tensors() -> None:
    """deepseek_v4's norms, hy_v4's hyper-connections and inkling's convolutions call `.to(dtype=float32)` in
    their own __init__, which cannot swap fake parameters ("Couldn't swap")."""

    class CastsItself(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = torch.nn.LayerNorm(8, dtype=torch.bfloat16).to(dtype=torch.float32)
            self.proj = torch.nn.Linear(8, 8)

    with fake_tensors():
        model = CastsItself()
    assert model.norm.weight.dtype == torch.float32
    real = torch.nn.Linear(4, 4).to(dtype=torch.float64)  # outside: torch's own _apply
    assert real.weight.dtype == torch.float64


def test_a_config_that_refuses_a_layer_count_is_one_line() -> None:
    import pytest
    from transformers import AutoConfig

    from optprof.errors import UsageError
    from optprof.model.loading import apply_overrides

    config = AutoConfig.for_model("prophetnet")  # sets its encoder's and decoder's layers, not num_hidden_layers
    with pytest.raises(UsageError, match="does not take num_hidden_layers"):
        apply_overrides(config, {"num_hidden_layers": 2})
