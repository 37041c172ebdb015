"""Model-aware recipes (issue 15): Muon and its variants, APOLLO, GaLore split the model into parts."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import torch
from support.cli import run

from optprof.model.loading import load_model
from optprof.optimizers.hybrid import Hybrid, parts_of
from optprof.optimizers.registry import REGISTRY, availability


def test_muon_state_on_llama_2_7b_splits_into_hidden_matrices_and_the_adamw_rest(capsys) -> None:  # type: ignore[no-untyped-def]
    """Counted from the config alone: Llama-2-7B's hidden matrices are q, k, v, o (4096 x 4096) and gate, up,
    down (4096 x 11008) in each of 32 layers; the rest is the embedding, the untied head and 65 RMSNorm
    weights. Muon keeps one fp32 momentum per hidden-matrix element; AdamW two moments per element plus one
    fp32 step counter per tensor."""
    hidden_size, intermediate, layers, vocab = 4096, 11008, 32, 32000
    hidden = layers * (4 * hidden_size * hidden_size + 3 * hidden_size * intermediate)
    norms = 2 * layers + 1
    rest = 2 * vocab * hidden_size + norms * hidden_size
    rest_tensors = 2 + norms

    code, out, _ = run(["state-size", "llama-2-7b", "-o", "muon,adamw", "-f", "json"], capsys)
    assert code == 0
    rows = {row["optimizer"]: row for row in json.loads(out)["results"]}
    muon, adamw = rows["muon"]["state_parts"]
    assert (muon["name"], muon["parameters"], muon["state_bytes"]) == ("muon", hidden, 4 * hidden)
    assert (adamw["name"], adamw["parameters"], adamw["state_bytes"]) == ("adamw", rest, 8 * rest + 4 * rest_tensors)
    assert rows["muon"]["state_bytes"] == 4 * hidden + 8 * rest + 4 * rest_tensors == 28_003_303_692
    assert rows["adamw"]["state_parts"] == []


def test_hybrid_steps_every_part_as_one_optimizer(model_dir: Callable[[str], str]) -> None:
    """A real CPU step: both parts move, the state dict round-trips, zero_grad reaches every group, and a
    learning-rate change on the hybrid reaches the inner optimizers (they share the group dicts)."""
    loaded = load_model(model_dir("tiny-llama"), device="cpu")
    model = loaded.module
    optimizer = REGISTRY["muon"].build(model, loaded.info, {})
    assert isinstance(optimizer, Hybrid) and [p.name for p in parts_of(optimizer)] == ["muon", "adamw"]
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randint(0, 128, (2, 8)), labels=torch.randint(0, 128, (2, 8))).loss.backward()
    optimizer.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    muon_params, adamw_params = (part.params for part in parts_of(optimizer))
    assert set(optimizer.state[muon_params[0]]) == {"momentum_buffer"}
    assert set(optimizer.state[adamw_params[0]]) == {"step", "exp_avg", "exp_avg_sq"}

    restored = REGISTRY["muon"].build(model, loaded.info, {})
    restored.load_state_dict(optimizer.state_dict())
    assert torch.equal(restored.state[muon_params[0]]["momentum_buffer"],
                       optimizer.state[muon_params[0]]["momentum_buffer"])
    optimizer.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    for group in optimizer.param_groups:
        group["lr"] = 0.5
    assert all(group["lr"] == 0.5 for inner in optimizer.inner for group in inner.param_groups)


@pytest.mark.parametrize("name", ["normuon", "adamuon", "apollo", "apollo-mini", "galore"])
def test_parts_cover_every_trainable_parameter_once(name: str, model_dir: Callable[[str], str]) -> None:
    if availability(REGISTRY[name]) is not None:
        pytest.skip(availability(REGISTRY[name]))
    loaded = load_model(model_dir("tiny-gpt2"))  # tied embeddings, fused QKV, biases
    optimizer = REGISTRY[name].build(loaded.module, loaded.info, {})
    ids = [id(p) for part in parts_of(optimizer) for p in part.params]
    assert sorted(ids) == sorted(id(p) for p in loaded.module.parameters() if p.requires_grad)


def test_apollo_mini_keeps_far_less_than_apollo_and_adamw() -> None:
    from optprof.commands.state_size import run_state_size
    from optprof.config import ModelSelection, StateSizeConfig

    if availability(REGISTRY["apollo"]) is not None:
        pytest.skip(availability(REGISTRY["apollo"]))
    rows = {r.optimizer: r for r in run_state_size(StateSizeConfig(
        ModelSelection("tinyllama-1.1b"), ("adamw", "apollo", "apollo-mini"))).results}
    assert rows["apollo-mini"].state_bytes < rows["apollo"].state_bytes < rows["adamw"].state_bytes
    projected = rows["apollo-mini"].state_parts[0]
    assert projected.state_bytes < 0.01 * 8 * projected.parameters  # rank-1 moments, not full-size ones


# ------------------------------------------------------------------------- updates inside backward (LOMO)


@pytest.mark.skipif(torch.cuda.is_available(), reason="AdaLomo's state is made with .cuda(): here it runs")
def test_adalomo_without_cuda_is_unsupported_with_the_librarys_reason() -> None:
    from optprof.commands.state_size import run_state_size
    from optprof.config import ModelSelection, StateSizeConfig

    if availability(REGISTRY["adalomo"]) is not None:
        pytest.skip(availability(REGISTRY["adalomo"]))
    (row,) = run_state_size(StateSizeConfig(ModelSelection("demo"), ("adalomo",))).results
    assert row.status == "unsupported" and "needs CUDA" in row.reason and "Torch not compiled" in row.reason


# ------------------------------------------------------------------------- a step that differentiates gradients


