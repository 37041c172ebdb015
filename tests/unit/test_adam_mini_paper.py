"""adam-mini-paper against updates worked out by hand from the paper's Algorithm 1."""

from __future__ import annotations

import math

import pytest
import torch

from optprof.model.loading import load_model
from optprof.optimizers.adam_mini_paper import AdamMiniPaper, paper_partition

LR, BETA1, BETA2, EPS, WD = 0.1, 0.9, 0.99, 1e-8, 0.01


def tiny_llama(model_dir):  # type: ignore[no-untyped-def]
    loaded = load_model(model_dir("tiny-llama"), device="cpu")
    return loaded.module, loaded.info


def optimizer_for(model, info) -> AdamMiniPaper:  # type: ignore[no-untyped-def]
    partition = paper_partition(model, num_heads=info.num_heads, num_kv_heads=info.num_kv_heads,
                                head_dim=info.head_dim)
    return AdamMiniPaper(partition, lr=LR, betas=(BETA1, BETA2), eps=EPS, weight_decay=WD)


def set_grads(model, step: int) -> None:  # type: ignore[no-untyped-def]
    for i, p in enumerate(model.parameters()):
        g = torch.linspace(-1.0, 2.0, p.numel()).reshape(p.shape)
        p.grad = g * (1 + i % 3) + 0.1 * step  # different per tensor and per step


def test_partition_follows_algorithms_2_and_4(model_dir) -> None:  # type: ignore[no-untyped-def]
    model, _ = tiny_llama(model_dir)
    parts = {part.name: part for _, part in paper_partition(model, num_heads=4, num_kv_heads=2, head_dim=8)}
    assert parts["model.embed_tokens.weight"].full and parts["lm_head.weight"].full
    assert parts["model.layers.0.self_attn.q_proj.weight"].num_blocks == 4  # by query head
    assert parts["model.layers.0.self_attn.k_proj.weight"].num_blocks == 2  # by key (kv) head
    for name in ("self_attn.v_proj.weight", "self_attn.o_proj.weight", "mlp.up_proj.weight",
                 "input_layernorm.weight"):
        part = parts[f"model.layers.1.{name}"]
        assert not part.full and part.num_blocks == 1  # PyTorch's default partition


def test_fused_gpt2_attention_split_into_q_heads_k_heads_and_v(model_dir) -> None:  # type: ignore[no-untyped-def]
    loaded = load_model(model_dir("tiny-gpt2"), device="cpu")
    pairs = paper_partition(loaded.module, num_heads=4, num_kv_heads=4, head_dim=8)
    parts = {part.name: part for _, part in pairs}
    c_attn = parts["transformer.h.0.attn.c_attn.weight"]
    assert c_attn.num_blocks == 4 + 4 + 1
    assert {s.axis for s in c_attn.segments} == {1}  # Conv1D stores (in, out)
    assert parts["transformer.wte.weight"].full
    assert len(pairs) == sum(1 for _ in loaded.module.parameters())  # tied lm_head not listed twice


def reference_step(p0: torch.Tensor, grads: list[torch.Tensor], blocks: list[torch.Tensor] | None) -> torch.Tensor:
    """Algorithm 1, written out with plain loops. blocks: boolean masks, or None for a full v."""
    p = p0.clone()
    m = torch.zeros_like(p)
    v = torch.zeros_like(p) if blocks is None else torch.zeros(len(blocks))
    for t, g in enumerate(grads, start=1):
        p = p - LR * WD * p
        m = (1 - BETA1) * g + BETA1 * m
        m_hat = m / (1 - BETA1**t)
        if blocks is None:
            v = (1 - BETA2) * g * g + BETA2 * v
            v_hat = v / (1 - BETA2**t)
            p = p - LR * m_hat / torch.sqrt(v_hat + EPS)
        else:
            update = torch.empty_like(p)
            for b, mask in enumerate(blocks):
                v[b] = (1 - BETA2) * (g[mask] ** 2).mean() + BETA2 * v[b]
                v_hat = v[b] / (1 - BETA2**t)
                update[mask] = m_hat[mask] / math.sqrt(v_hat + EPS)
            p = p - LR * update
    return p


def row_blocks(shape: torch.Size, n: int) -> list[torch.Tensor]:
    rows = shape[0] // n
    masks = []
    for b in range(n):
        mask = torch.zeros(shape, dtype=torch.bool)
        mask[b * rows : (b + 1) * rows] = True
        masks.append(mask)
    return masks


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("model.embed_tokens.weight", "full"),
        ("lm_head.weight", "full"),
        ("model.layers.0.self_attn.q_proj.weight", 4),
        ("model.layers.0.self_attn.k_proj.weight", 2),
        ("model.layers.1.self_attn.v_proj.weight", 1),
        ("model.layers.1.mlp.down_proj.weight", 1),
        ("model.norm.weight", 1),
    ],
)
def test_two_steps_match_algorithm_1(model_dir, name: str, kind) -> None:  # type: ignore[no-untyped-def]
    model, info = tiny_llama(model_dir)
    params = dict(model.named_parameters())
    p = params[name]
    p0 = p.detach().clone()
    optimizer = optimizer_for(model, info)
    grads = []
    for step in range(2):
        set_grads(model, step)
        grads.append(p.grad.clone())
        optimizer.step()
    blocks = None if kind == "full" else row_blocks(p.shape, kind)
    expected = reference_step(p0, grads, blocks)
    torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-6)
    assert not torch.equal(p.detach(), p0)


def test_fused_segment_update_matches_reference(model_dir) -> None:  # type: ignore[no-untyped-def]
    loaded = load_model(model_dir("tiny-gpt2"), device="cpu")
    model = loaded.module
    p = dict(model.named_parameters())["transformer.h.0.attn.c_attn.weight"]  # (32, 96): [Q | K | V]
    p0 = p.detach().clone()
    optimizer = optimizer_for(model, loaded.info)
    grads = []
    for step in range(2):
        set_grads(model, step)
        grads.append(p.grad.clone())
        optimizer.step()
    masks = []
    for start, width in [(0, 8), (8, 8), (16, 8), (24, 8), (32, 8), (40, 8), (48, 8), (56, 8), (64, 32)]:
        mask = torch.zeros(p.shape, dtype=torch.bool)
        mask[:, start : start + width] = True
        masks.append(mask)
    torch.testing.assert_close(p.detach(), reference_step(p0, grads, masks), rtol=1e-5, atol=1e-6)


def test_trains_a_tiny_model(model_dir) -> None:  # type: ignore[no-untyped-def]
    model, info = tiny_llama(model_dir)
    optimizer = optimizer_for(model, info)
    for group in optimizer.param_groups:
        group["lr"], group["weight_decay"] = 1e-2, 0.0
    tokens = torch.randint(0, 128, (4, 16))
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        loss = model(tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
