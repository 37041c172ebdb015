"""The official adam-mini package on architectures whose parameter names mislead it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support.architectures import write_tiny

from optprof.model.loading import load_model
from optprof.optimizers.adam_mini_official import PER_HEAD, PER_ROW, WHOLE
from optprof.optimizers.registry import REGISTRY


def _build(family: str, tmp_path: Path):  # type: ignore[no-untyped-def]
    loaded = load_model(write_tiny(family, tmp_path), device="cpu")
    optimizer = REGISTRY["adam-mini"].build(loaded.module, loaded.info, {})
    roles = {name: group["role"] for (name, _), group in zip(loaded.module.named_parameters(),
                                                             optimizer.param_groups, strict=True)}
    return loaded, optimizer, roles


def test_norms_named_like_outputs_take_one_block(tmp_path: Path) -> None:
    _, _, roles = _build("opt", tmp_path)
    assert roles["model.decoder.layers.0.final_layer_norm.weight"] == WHOLE  # "final_layer" is an output name
    assert roles["model.decoder.layers.0.self_attn.q_proj.weight"] == PER_HEAD
    assert roles["model.decoder.layers.0.fc1.weight"] == WHOLE  # no name the package knows: as the package does
    assert roles["model.decoder.embed_tokens.weight"] == "embedding"


def test_embedding_found_by_structure_not_by_its_norm_s_name(tmp_path: Path) -> None:
    _, _, roles = _build("bloom", tmp_path)
    assert roles["transformer.word_embeddings.weight"] == "embedding" and roles["lm_head.weight"] == "output"
    assert roles["transformer.word_embeddings_layernorm.weight"] == WHOLE  # 1-D, though named "embed…"


def test_each_expert_row_gets_its_own_v_and_the_update_is_the_package_s(tmp_path: Path) -> None:
    """A 3-D expert tensor steps exactly as the package steps the same rows held as a 2-D MLP weight."""
    from adam_mini import Adam_mini

    loaded, optimizer, roles = _build("mixtral", tmp_path)
    experts = loaded.module.model.layers[0].mlp.experts.gate_up_proj  # (experts, 2 x intermediate, hidden)
    assert roles["model.layers.0.mlp.experts.gate_up_proj"] == PER_ROW
    reference = torch.nn.Parameter(experts.detach().clone().view(-1, experts.shape[-1]))
    grad = torch.randn_like(experts)
    for param in loaded.module.parameters():
        param.grad = torch.zeros_like(param)
    experts.grad = grad.clone()
    reference.grad = grad.clone().view(reference.shape)
    package = Adam_mini([("mlp.weight", reference)], dim=32, n_heads=4, verbose=False)
    package.check_block_name, package.world_size = False, 1
    optimizer.step()
    package.step()
    assert torch.equal(experts.detach().view(reference.shape), reference.detach())
    (state,) = [s for p, s in optimizer.state.items() if p.data_ptr() == experts.data_ptr()]
    assert state["vmean"].shape == (experts.shape[0] * experts.shape[1], 1)
    optimizer.zero_grad()
    assert experts.grad is None  # the model's own gradient is dropped too, not only the view's


def test_expert_views_are_not_counted_as_state_when_sharded(tmp_path: Path) -> None:
    """Under FSDP2 the 2-D views are DTensors over the shards' storage: parameters, not state."""
    from optprof.commands.state_size import run_state_size
    from optprof.config import ModelSelection, StateSizeConfig

    model = ModelSelection(write_tiny("mixtral", tmp_path))
    single = {r.optimizer: r for r in run_state_size(StateSizeConfig(model, ("adamw", "adam-mini"))).results}
    sharded = {r.optimizer: r for r in run_state_size(StateSizeConfig(model, ("adamw", "adam-mini"), gpus=2)).results}
    for name in ("adamw", "adam-mini"):
        assert sharded[name].status == "ok", sharded[name].reason
        assert sharded[name].bytes_per_param == pytest.approx(single[name].bytes_per_param, rel=0.01), name
