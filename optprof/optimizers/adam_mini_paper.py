"""Adam-mini as the paper defines it (Zhang et al. 2024, Algorithms 1-4).

- Algorithm 2: Query and Key are partitioned by head; every other tensor is one block (PyTorch's default).
  Beyond the paper's dense models: each routed expert is its own block (a 3-D expert tensor splits along
  its first axis); multi-head latent attention (DeepSeek) splits its per-head up-projections, `q_b_proj`
  (Query) and `kv_b_proj` (Key and Value of each head), by head, and keeps the compressed down-projections
  whole; a model without attention (Mamba) has only embedding/output and whole blocks.
- Algorithm 4: the embedding and output layers ("embd_blocks") keep a full, per-element second moment.
- Algorithm 1: elsewhere v is a moving average of mean(g * g) over the block, one value per block.

The official `adam-mini` package (>= 1.1) differs: it keeps one v per row of the embedding and output
layers (and per neuron for values, projections and MLPs), so it saves more than the paper's Table 1.
This module exists so that optprof can reproduce the paper's numbers with a real, stepping optimizer.

Update, per Algorithm 1 (eps inside the square root, as line 15 writes it):
    p -= lr * wd * p;  m = b1 m + (1-b1) g;  v = b2 v + (1-b2) {g*g | mean(g*g)}
    p -= lr * (m / (1 - b1^t)) / sqrt(v / (1 - b2^t) + eps)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from optprof.models import embedding_weights

# Leaf module names of separate query / key projections across common transformers architectures.
QUERY_KEY_NAMES = frozenset({"q_proj", "k_proj", "wq", "wk", "query", "key", "q_lin", "k_lin", "q", "k"})
# Multi-head latent attention's per-head up-projections: one block per head (rows are heads x per-head size).
LATENT_HEAD_NAMES = frozenset({"q_b_proj", "kv_b_proj"})
# Leaf names of fused projections laid out as [Q | K | V] along the output dimension. GPT-NeoX and
# Falcon's `query_key_value` interleave heads instead, so they are left to the default partition.
FUSED_QKV_NAMES = frozenset({"c_attn", "qkv_proj", "Wqkv", "qkv"})


@dataclass(frozen=True)
class Segment:
    """A slice [start, stop) of a tensor along `axis`, cut into `blocks` equal blocks of one v each."""

    axis: int
    start: int
    stop: int
    blocks: int


@dataclass(frozen=True)
class Partition:
    """How one parameter is split. `full=True`: one v per element (embd_blocks)."""

    name: str
    full: bool
    segments: tuple[Segment, ...] = ()

    @property
    def num_blocks(self) -> int:
        return sum(s.blocks for s in self.segments)


def _whole(name: str, param: torch.Tensor) -> Partition:
    axis_len = param.shape[0] if param.dim() else 1
    return Partition(name, full=False, segments=(Segment(0, 0, axis_len, 1),))


def _output_axis(module: nn.Module, param: torch.Tensor) -> int:
    """transformers' Conv1D (GPT-2) stores weights as (in, out); nn.Linear as (out, in)."""
    if param.dim() == 1:
        return 0
    return 1 if type(module).__name__ == "Conv1D" else 0


def _by_heads(name: str, param: torch.Tensor, heads: int) -> Partition:
    """Rows cut into `heads` equal blocks; the whole tensor where the rows are not whole heads."""
    if param.dim() == 2 and param.shape[0] % heads == 0:
        return Partition(name, False, (Segment(0, 0, param.shape[0], heads),))
    return _whole(name, param)


def paper_partition(
    model: nn.Module, *, num_heads: int | None, num_kv_heads: int | None, head_dim: int | None
) -> list[tuple[torch.Tensor, Partition]]:
    """Algorithms 2 and 4 over a transformers causal LM. Each parameter appears once (tied weights too)."""
    embd_ids = {id(weight) for weight in embedding_weights(model) if weight is not None}

    modules = dict(model.named_modules())
    seen: set[int] = set()
    result: list[tuple[torch.Tensor, Partition]] = []
    for name, param in model.named_parameters():  # shared (tied) parameters are yielded once
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        module_name, _, _ = name.rpartition(".")
        leaf = module_name.rpartition(".")[2]
        module = modules.get(module_name)
        if id(param) in embd_ids:
            result.append((param, Partition(name, full=True)))
        elif param.dim() >= 3:  # routed experts stacked on the first axis: one block each
            result.append((param, Partition(name, False, (Segment(0, 0, param.shape[0], param.shape[0]),))))
        elif num_heads is None or num_kv_heads is None or head_dim is None:
            result.append((param, _whole(name, param)))  # no attention heads to split by
        elif leaf in QUERY_KEY_NAMES:
            heads = num_heads if leaf.startswith(("q", "wq")) else num_kv_heads
            result.append((param, _by_heads(name, param, heads)))
        elif leaf in LATENT_HEAD_NAMES:
            result.append((param, _by_heads(name, param, num_heads)))
        elif leaf in FUSED_QKV_NAMES and module is not None:
            axis = _output_axis(module, param)
            q, kv = num_heads * head_dim, num_kv_heads * head_dim
            if param.shape[axis] == q + 2 * kv:
                segments = (
                    Segment(axis, 0, q, num_heads),
                    Segment(axis, q, q + kv, num_kv_heads),
                    Segment(axis, q + kv, q + 2 * kv, 1),  # Value: one block (Algorithm 2's "else")
                )
                result.append((param, Partition(name, False, segments)))
            else:
                result.append((param, _whole(name, param)))
        else:
            result.append((param, _whole(name, param)))
    return result


def _blocked(tensor: torch.Tensor, segment: Segment) -> torch.Tensor:
    """The segment as a (blocks, elements per block) matrix; blocks are contiguous along `axis`."""
    part = tensor.narrow(segment.axis, segment.start, segment.stop - segment.start)
    part = part.movedim(segment.axis, 0)
    return part.reshape(segment.blocks, -1)


class AdamMiniPaper(torch.optim.Optimizer):
    """Adam-mini per the paper's Algorithm 1. State per parameter: `m` (full) and `v` (full or per block)."""

    def __init__(
        self,
        partitioned: Sequence[tuple[torch.Tensor, Partition]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        if lr < 0.0 or eps < 0.0 or weight_decay < 0.0:
            raise ValueError("lr, eps and weight_decay must be non-negative")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must lie in [0, 1): {betas}")
        self.partitions: dict[torch.Tensor, Partition] = {p: part for p, part in partitioned}
        params: Iterable[torch.Tensor] = [p for p, _ in partitioned]
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                partition = self.partitions[p]
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["m"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    v_shape = p.shape if partition.full else (partition.num_blocks,)
                    state["v"] = torch.zeros(v_shape, dtype=p.dtype, device=p.device)
                state["step"] += 1
                t = state["step"]
                grad, m, v = p.grad, state["m"], state["v"]

                if weight_decay:
                    p.mul_(1 - lr * weight_decay)
                m.mul_(beta1).add_(grad, alpha=1 - beta1)
                bias1, bias2 = 1 - beta1**t, 1 - beta2**t
                if partition.full:
                    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                    p.addcdiv_(m, (v / bias2).add_(eps).sqrt_(), value=-lr / bias1)
                    continue
                offset = 0
                for segment in partition.segments:
                    v_seg = v[offset : offset + segment.blocks]
                    offset += segment.blocks
                    v_seg.mul_(beta2).add_(_blocked(grad, segment).square().mean(dim=1), alpha=1 - beta2)
                    denom = (v_seg / bias2).add_(eps).sqrt_().unsqueeze(1)  # (blocks, 1) broadcasts
                    update = _blocked(m, segment) / denom
                    target = p.narrow(segment.axis, segment.start, segment.stop - segment.start)
                    moved = target.movedim(segment.axis, 0)
                    moved.sub_(update.reshape(moved.shape), alpha=lr / bias1)
        return loss
